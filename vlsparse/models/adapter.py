"""Model adapters: where each family keeps its layers, heads, projector and image tokens.

One ``Adapter`` class with a small table of per-family facts; no copied model
forwards. Families: ``llava`` (LLaVA 1.5 / NeXT / OneVision), ``qwen2_vl``,
``qwen2_5_vl`` and ``causal_lm`` (Llama-style decoder-only LMs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlsparse.errors import UnsupportedModelError
from vlsparse.profile import ModelFingerprint, config_sha256

VLM_FAMILIES = {
    "llava": "llava",
    "llava_next": "llava",
    "llava_onevision": "llava",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
}
CAUSAL_LM_TYPES = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo2", "phi3", "gemma", "gemma2"}
SUPPORTED_TEXT = "LLaVA (llava, llava_next, llava_onevision), Qwen2-VL, Qwen2.5-VL, Llama-style *ForCausalLM"


def family_of(config: dict) -> str:
    """Map a parsed config.json to a family name, or raise ``UnsupportedModelError``."""
    model_type = config.get("model_type", "")
    architectures = config.get("architectures") or []
    if model_type in VLM_FAMILIES:
        return VLM_FAMILIES[model_type]
    if model_type in CAUSAL_LM_TYPES and any(a.endswith("ForCausalLM") for a in architectures or ["ForCausalLM"]):
        return "causal_lm"
    name = architectures[0] if architectures else model_type or "unknown"
    raise UnsupportedModelError(f"architecture {name} is not supported", f"supported: {SUPPORTED_TEXT}")


@dataclass(frozen=True)
class ImageSpan:
    """Token positions of one image in a processed prompt.

    ``start``/``end`` (exclusive) cover all of the image's tokens; the patch
    grid of ``rows`` x ``cols`` tokens (after any merge) starts at
    ``grid_start`` (a CLS token may precede it). ``rows``/``cols`` are 0 when
    the layout is not a single grid (LLaVA-NeXT any-res tiles).
    """

    image_index: int
    start: int
    end: int
    rows: int
    cols: int
    grid_start: int

    @property
    def length(self) -> int:
        return self.end - self.start


def _token_runs(ids: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of ``token_id`` in a 1-D id tensor."""
    hits = (ids == token_id).nonzero().flatten().tolist()
    runs: list[tuple[int, int]] = []
    for pos in hits:
        if runs and runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], pos + 1)
        else:
            runs.append((pos, pos + 1))
    return runs


class Adapter:
    """Uniform access to a loaded model's parts, for one family."""

    def __init__(self, model: nn.Module, family: str, name: str = "model") -> None:
        self.model = model
        self.family = family
        self.name = name
        self.text_config = model.config.get_text_config()

    # -- structure -----------------------------------------------------------------
    @property
    def is_vlm(self) -> bool:
        return self.family != "causal_lm"

    def language_model(self) -> nn.Module:
        inner = self.model.model
        return inner.language_model if self.is_vlm else inner

    def lm_layers(self) -> list[nn.Module]:
        return list(self.language_model().layers)

    def vision_tower(self) -> nn.Module | None:
        if self.family == "llava":
            return self.model.model.vision_tower
        if self.family in ("qwen2_vl", "qwen2_5_vl"):
            return self.model.model.visual
        return None

    def vision_layers(self) -> list[nn.Module]:
        tower = self.vision_tower()
        if tower is None:
            return []
        if self.family == "llava":
            inner = getattr(tower, "vision_model", tower)
            return list(inner.encoder.layers)
        return list(tower.blocks)

    def projector(self) -> nn.Module | None:
        if self.family == "llava":
            return self.model.model.multi_modal_projector
        if self.family in ("qwen2_vl", "qwen2_5_vl"):
            return self.model.model.visual.merger
        return None

    @staticmethod
    def attention(layer: nn.Module) -> nn.Module:
        for attr in ("self_attn", "attn", "attention"):
            if hasattr(layer, attr):
                return getattr(layer, attr)
        raise AttributeError(f"{type(layer).__name__} has no attention module")

    @staticmethod
    def mlp(layer: nn.Module) -> nn.Module:
        return layer.mlp

    @classmethod
    def mlp_projections(cls, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The (gate, up, down) projections of a layer's MLP."""
        mlp = cls.mlp(layer)
        return mlp.gate_proj, mlp.up_proj, mlp.down_proj

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
        from vlsparse.models.processors import prepare_inputs

        return prepare_inputs(processor, self.family, images, question)

    def prepare_text(self, processor, text: str):
        """Inputs for plain text (no chat template, no images): calibration and perplexity."""
        tokenizer = getattr(processor, "tokenizer", processor)
        return tokenizer(text, return_tensors="pt")

    # -- images ------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int | None:
        config = self.model.config
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(config, attr, None)
            if value is not None:
                return int(value)
        return None

    def image_spans(self, inputs, batch_index: int = 0) -> list[ImageSpan]:
        """Where each image's tokens sit in ``inputs['input_ids'][batch_index]``.

        Image tokens are cut in order by each image's token count (from the
        vision config for LLaVA, from ``image_grid_thw`` for Qwen), so images
        whose tokens touch are still told apart. Where the counts are unknown
        (LLaVA-NeXT any-res), each run of image tokens is one span without a grid.
        """
        if not self.is_vlm:
            return []
        ids = inputs["input_ids"][batch_index]
        positions = (ids == self.image_token_id).nonzero().flatten().tolist()
        grids = self._image_grids(inputs, len(positions))
        if grids is None:
            return [ImageSpan(i, s, e, 0, 0, s) for i, (s, e) in enumerate(_token_runs(ids, self.image_token_id))]
        spans, offset = [], 0
        for index, (extra, rows, cols, frames) in enumerate(grids):
            count = extra + frames * rows * cols
            start, end = positions[offset], positions[offset + count - 1] + 1
            spans.append(ImageSpan(index, start, end, rows, cols, start + extra))
            offset += count
        return spans

    def _image_grids(self, inputs, n_image_tokens: int) -> list[tuple[int, int, int, int]] | None:
        """Per image: (tokens before the grid, rows, cols, frames), or None if unknown."""
        config = self.model.config
        if self.family == "llava":
            vision = config.vision_config
            if getattr(config, "model_type", "llava") != "llava" or "pixel_values" not in inputs:
                return None
            side = int(vision.image_size) // int(vision.patch_size)
            extra = 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0
            grids = [(extra, side, side, 1)] * int(inputs["pixel_values"].shape[0])
        else:
            thw = inputs.get("image_grid_thw")
            if thw is None:
                return None
            merge = int(getattr(config.vision_config, "spatial_merge_size", 2))
            grids = [(0, int(h) // merge, int(w) // merge, int(t)) for t, h, w in thw.tolist()]
        if sum(e + f * r * c for e, r, c, f in grids) != n_image_tokens:
            return None
        return grids
