"""What every model family shares: the ``Adapter`` base class and ``VisionLanguageAdapter``.

An adapter gives uniform access to a loaded model's parts (language-model layers,
attention and MLP modules, vision tower, projector, image token positions) and
knows the family's processor and prompt format. Each family is one subclass in its
own module of ``vlsparse.models.families``, keyed by config.json's ``model_type``;
the registry there maps model types to classes. No model forward is copied.

``Adapter(model, "llava")`` builds the class of the named family (and
``Adapter(model)`` the family of ``model.config``), so callers need not know the
subclasses. Class-level facts (``family``, ``is_vlm``, ``auto_model_class``,
``load_processor``, ``format_prompt``, ``prepare_inputs``) work without a model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from vlsparse.errors import InputError, ModelLoadError
from vlsparse.profile import ModelFingerprint, config_sha256


@dataclass(frozen=True)
class ImageSpan:
    """Token positions of one image in a processed prompt.

    ``start``/``end`` (exclusive) cover all of the image's tokens; the patch
    grid of ``rows`` x ``cols`` tokens (after any merge) starts at
    ``grid_start`` (a CLS token may precede it). ``rows``/``cols`` are 0 when
    the layout is not a single grid.

    ``part`` says which of the image's tokens the span holds when an image takes several
    spans (tokens of other kinds between or a layout of several grids): ``"image"`` (all of
    them), ``"tile"`` / ``"global"`` (one crop of a split image / the downscaled whole image
    after its crops: Idefics3, SmolVLM, InternVL), ``"base"`` / ``"anyres"`` (LLaVA-NeXT/OneVision's base
    image / its stitched any-res crops, each row ended by a newline token that ``cols`` counts).
    Spans of one image share ``image_index``.
    """

    image_index: int
    start: int
    end: int
    rows: int
    cols: int
    grid_start: int
    part: str = "image"

    @property
    def length(self) -> int:
        return self.end - self.start


def square_image_grids(inputs, side: int, image_token_id: int | None) -> list[tuple[int, int, int, int]] | None:
    """One ``side`` x ``side`` grid per image, for families whose every image gives the same square of tokens.

    The image count is ``pixel_values``' batch, else the image tokens over one image's count;
    None when neither says (or the tokens do not split into whole images).
    """
    if inputs.get("pixel_values") is not None:
        count = int(inputs["pixel_values"].shape[0])
    elif inputs.get("input_ids") is not None and image_token_id is not None:
        tokens = int((inputs["input_ids"][0] == image_token_id).sum())
        if tokens % (side * side):
            return None
        count = tokens // (side * side)
    else:
        return None
    return [(0, side, side, 1)] * count


def true_runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of True in a 1-D boolean tensor."""
    runs: list[tuple[int, int]] = []
    for pos in flags.nonzero().flatten().tolist():
        if runs and runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], pos + 1)
        else:
            runs.append((pos, pos + 1))
    return runs


def _token_runs(ids: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of ``token_id`` in a 1-D id tensor."""
    return true_runs(ids == token_id)


def tokenizer_of(processor):
    """The tokenizer of a processor (a tokenizer is its own)."""
    return getattr(processor, "tokenizer", processor)


def chat_template(processor) -> str | None:
    """The processor's chat template, else its tokenizer's, else None."""
    return getattr(processor, "chat_template", None) or getattr(tokenizer_of(processor), "chat_template", None)


def torchvision_available() -> bool:
    """Whether torchvision is installed (video processors, and so some processors, need it)."""
    from importlib.util import find_spec

    return find_spec("torchvision") is not None


def image_only_processor(folder: Path, processor: str, image_processor: str, trust_remote_code: bool, **settings):
    """The ``processor`` class of transformers (e.g. ``"InternVLProcessor"``) built without its video
    processor, from the tokenizer and the PIL ``image_processor`` (e.g. ``"GotOcr2"``) saved in ``folder``:
    for when ``AutoProcessor`` fails for want of torchvision. ``settings``: the processor's own arguments."""
    from transformers import AutoTokenizer

    from vlsparse.compat import image_only_processor_class, pil_image_processor_class

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    images = pil_image_processor_class(image_processor).from_pretrained(folder)
    return image_only_processor_class(processor)(images, tokenizer, chat_template=chat_template(tokenizer), **settings)


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message (some start with a newline), else its type."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def check_question(question: str) -> None:
    if not question or not question.strip():
        raise InputError("the question is empty", "pass the question as the last argument, in quotes")


class Adapter(ABC):
    """Uniform access to a loaded model's parts, for one family (subclasses are the families).

    Class attributes: ``family`` (the name profiles and configs record), ``MODEL_TYPES``
    (the config.json ``model_type`` values it serves), ``SUPPORTED`` (how error messages
    name it) and ``is_vlm`` (whether it takes images).
    """

    family: ClassVar[str] = ""
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()
    SUPPORTED: ClassVar[str] = ""
    is_vlm: ClassVar[bool] = False
    image_tokens: ClassVar[bool] = False
    """Whether images become tokens of the language model's sequence (what token methods and core
    tokens drop); a VLM whose images enter through cross-attention (Mllama) has none."""

    def __new__(cls, model: nn.Module | None = None, family: str | None = None, name: str = "model"):
        if cls is Adapter:  # the base stands for "the right family": build that subclass
            from vlsparse.models.families import family_for, family_named

            cls = family_named(family) if family is not None else family_for(model.config.to_dict())
        return super().__new__(cls)

    def __init__(self, model: nn.Module, family: str | None = None, name: str = "model") -> None:
        if family is not None and family != self.family:
            raise ValueError(f"{type(self).__name__} adapts the {self.family} family, not {family}")
        self.model = model
        self.name = name
        self.text_config = model.config.get_text_config()

    # -- the family, without a model -------------------------------------------------
    @classmethod
    def accepts(cls, config: dict) -> bool:
        """Whether a parsed config.json of one of ``MODEL_TYPES`` is really this family's."""
        return True

    @classmethod
    @abstractmethod
    def auto_model_class(cls):
        """The transformers ``AutoModelFor...`` class that builds this family's models."""

    @classmethod
    def required_sub_configs(cls, config: dict) -> tuple[str, ...]:
        """The sub-configs (``text_config``, ``vision_config``) config.json must hold, else
        transformers would silently build default-sized parts."""
        return ()

    @classmethod
    def load_processor(cls, folder: Path, trust_remote_code: bool = False):
        """The processor (VLMs) or tokenizer (LMs) saved in ``folder``; ``ModelLoadError`` if it cannot."""
        try:
            return cls.read_processor(folder, trust_remote_code)
        except ModelLoadError:
            raise
        except (OSError, ValueError, TypeError, KeyError, ImportError) as exc:
            raise ModelLoadError(
                f"cannot load the processor/tokenizer from {folder}: {first_line(exc)[:160]}",
                "the folder needs the tokenizer and preprocessor files saved by save_pretrained") from exc

    @classmethod
    def read_processor(cls, folder: Path, trust_remote_code: bool):
        """Read the processor in ``folder`` (errors are translated by ``load_processor``)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)

    @classmethod
    def format_prompt(cls, processor, question: str, n_images: int) -> str:
        """The prompt in the model's own format: its chat template, else the family's convention."""
        if chat_template(processor):
            messages = [{"role": "user", "content": cls.chat_content(question, n_images)}]
            try:
                return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception:  # noqa: BLE001 - a template that cannot take this message falls back below
                pass
        return cls.plain_prompt(processor, question, n_images)

    @classmethod
    @abstractmethod
    def chat_content(cls, question: str, n_images: int):
        """The ``content`` of the user message given to a chat template."""

    @classmethod
    @abstractmethod
    def plain_prompt(cls, processor, question: str, n_images: int) -> str:
        """The prompt when the processor has no (usable) chat template."""

    @classmethod
    @abstractmethod
    def prepare_inputs(cls, processor, images: list, question: str):
        """Model inputs (a ``BatchFeature`` of tensors on CPU) for images + question."""

    # -- structure -------------------------------------------------------------------
    @abstractmethod
    def language_model(self) -> nn.Module:
        """The decoder stack (the module holding ``layers``)."""

    def lm_layers(self) -> list[nn.Module]:
        return list(self.language_model().layers)

    @abstractmethod
    def vision_tower(self) -> nn.Module | None:
        """The vision encoder, or None for a text-only model."""

    @abstractmethod
    def vision_layers(self) -> list[nn.Module]:
        """The vision encoder's blocks ([] for a text-only model)."""

    @abstractmethod
    def projector(self) -> nn.Module | None:
        """The module mapping vision features into the language model, or None."""

    @staticmethod
    def attention(layer: nn.Module) -> nn.Module:
        for attr in ("self_attn", "attn", "attention"):
            if hasattr(layer, attr):
                return getattr(layer, attr)
        raise AttributeError(f"{type(layer).__name__} has no attention module")

    def self_attention(self, layer: nn.Module) -> nn.Module | None:
        """The layer's attention over the prompt's own tokens (what profiles and the sparse runtime
        change), or None for a layer without one (Mllama's cross-attention layers)."""
        return self.attention(layer)

    @staticmethod
    def mlp(layer: nn.Module) -> nn.Module:
        return layer.mlp

    @staticmethod
    def projections_of(mlp: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The (gate, up, down) projections of an MLP module (Llama-style gated names)."""
        return mlp.gate_proj, mlp.up_proj, mlp.down_proj

    @classmethod
    def mlp_projections(cls, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The (gate, up, down) projections of a layer's MLP."""
        return cls.projections_of(cls.mlp(layer))

    # -- head geometry ---------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        explicit = getattr(self.text_config, "head_dim", None)
        return int(explicit or self.text_config.hidden_size // self.num_heads)

    def fingerprint(self) -> ModelFingerprint:
        architectures = getattr(self.model.config, "architectures", None) or [type(self.model).__name__]
        return ModelFingerprint(
            architecture=architectures[0],
            name=self.name,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            config_sha256=config_sha256(self.model.config.to_dict()),
        )

    # -- inputs ------------------------------------------------------------------------
    def prepare(self, processor, images: list, question: str):
        """Inputs for images + question in the model's own prompt format (tensors on CPU)."""
        return self.prepare_inputs(processor, images, question)

    def prepare_text(self, processor, text: str):
        """Inputs for plain text (no chat template, no images): calibration and perplexity."""
        return tokenizer_of(processor)(text, return_tensors="pt")

    # -- images ------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int | None:
        config = self.model.config
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(config, attr, None)
            if value is not None:
                return int(value)
        return None

    @abstractmethod
    def image_spans(self, inputs, batch_index: int = 0) -> list[ImageSpan]:
        """Where each image's tokens sit in ``inputs['input_ids'][batch_index]``."""

    # -- token dropping ------------------------------------------------------------------
    def follow_token_drop(self, drop) -> list:
        """Hooks that keep what the family adds per token inside the language model in step with the
        survivors of ``drop`` (a ``vlsparse.kernels.token_drop.TokenDrop``); their handles. Most
        families add nothing: []. (Qwen3-VL adds DeepStack features to the first layers.)"""
        return []


class VisionLanguageAdapter(Adapter):
    """What the vision-language families share: a ``*ForConditionalGeneration`` whose
    ``model.language_model`` is the decoder, a processor taking text and images, and
    image spans cut from each image's token count (``image_grids``)."""

    def vision_tower(self) -> nn.Module:
        """``model.vision_tower`` (the LLaVA layout, which most families follow)."""
        return self.model.model.vision_tower

    def vision_layers(self) -> list[nn.Module]:
        """The tower's encoder layers (inside ``vision_model`` for CLIP and SigLIP towers)."""
        tower = self.vision_tower()
        return list(getattr(tower, "vision_model", tower).encoder.layers)

    def projector(self) -> nn.Module:
        """``model.multi_modal_projector`` (the LLaVA layout)."""
        return self.model.model.multi_modal_projector

    is_vlm: ClassVar[bool] = True
    image_tokens: ClassVar[bool] = True

    @classmethod
    def auto_model_class(cls):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    @classmethod
    def required_sub_configs(cls, config: dict) -> tuple[str, ...]:
        return ("text_config", "vision_config")

    @classmethod
    def chat_content(cls, question: str, n_images: int):
        return [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]

    @classmethod
    def prepare_inputs(cls, processor, images: list, question: str):
        check_question(question)
        prompt = cls.format_prompt(processor, question.strip(), len(images))
        kwargs = {"images": images} if images else {}
        try:
            return processor(text=[prompt], return_tensors="pt", **kwargs)
        except ValueError as exc:
            raise InputError(f"the processor rejected the input: {str(exc).splitlines()[0][:160]}",
                             "check the number of images against the prompt") from exc

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def image_spans(self, inputs, batch_index: int = 0) -> list[ImageSpan]:
        """Where each image's tokens sit in ``inputs['input_ids'][batch_index]``.

        Image tokens are cut in order by each image's token count (``image_grids``),
        so images whose tokens touch are still told apart. Where the counts are
        unknown, each run of image tokens is one span without a grid.
        """
        ids = inputs["input_ids"][batch_index]
        positions = (ids == self.image_token_id).nonzero().flatten().tolist()
        grids = self.image_grids(inputs)
        if grids is not None and sum(e + f * r * c for e, r, c, f in grids) != len(positions):
            grids = None
        if grids is None:
            return [ImageSpan(i, s, e, 0, 0, s) for i, (s, e) in enumerate(_token_runs(ids, self.image_token_id))]
        spans, offset = [], 0
        for index, (extra, rows, cols, frames) in enumerate(grids):
            count = extra + frames * rows * cols
            start, end = positions[offset], positions[offset + count - 1] + 1
            spans.append(ImageSpan(index, start, end, rows, cols, start + extra))
            offset += count
        return spans

    @abstractmethod
    def image_grids(self, inputs) -> list[tuple[int, int, int, int]] | None:
        """Per image: (tokens before the grid, rows, cols, frames), or None if unknown."""
