"""The Idefics3 family: Idefics3 and SmolVLM (same layout, one adapter).

A SigLIP-style vision tower (``model.vision_model``, blocks in ``encoder.layers``), a
connector (``model.connector``: pixel shuffle by ``scale_factor`` + a linear projection)
and a Llama-style language model (``model.text_model``). The processor splits an image
into ``rows`` x ``cols`` tiles and adds the whole image downscaled (the global image);
each becomes ``image_seq_len`` ``<image>`` tokens, a square grid of
``(image_size / patch_size) / scale_factor`` tokens per side (the pixel shuffle keeps
row-major order), preceded by ``<fake_token_around_image>`` and a ``<row_r_col_c>`` marker
(``<global-img>`` for the global image), with a newline after each row of tiles. An image
that is not split is its global image alone.

Spans: one per tile (``part`` ``"tile"``) and one for the global image (``"global"``, or
``"image"`` when the image was not split), each with its own grid; the tiles of an image
share its ``image_index``. The marker of the global image is read from the prompt (the
last image-token run of a prompt is always a global image), so no tokenizer is needed.
SmolVLM's processor wants torchvision (videos) and ``num2words``: without them it is
loaded without its video half.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from torch import nn

from vlsparse.models.families.base import ImageSpan, VisionLanguageAdapter, _token_runs, chat_template


class Idefics3Adapter(VisionLanguageAdapter):
    """Idefics3 / SmolVLM: SigLIP tower + pixel-shuffle connector + Llama-style LM, images split into tiles."""

    family: ClassVar[str] = "idefics3"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("idefics3", "smolvlm")
    SUPPORTED: ClassVar[str] = "Idefics3 / SmolVLM (idefics3, smolvlm)"

    @classmethod
    def read_processor(cls, folder: Path, trust_remote_code: bool):
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except ImportError:  # SmolVLM's video processor (torchvision) or num2words: images only
            config = json.loads((Path(folder) / "config.json").read_text())
            if config.get("model_type") != "smolvlm":
                raise
        return cls.image_only_smolvlm_processor(folder, config, trust_remote_code)

    @staticmethod
    def image_only_smolvlm_processor(folder: Path, config: dict, trust_remote_code: bool):
        """SmolVLM's processor without videos; ``image_seq_len`` is the model's own (from config.json)."""
        from transformers import AutoTokenizer

        from vlsparse.compat import image_only_smolvlm_processor_class, pil_image_processor_class

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        images = pil_image_processor_class("SmolVLM").from_pretrained(folder)
        vision = config.get("vision_config") or {}
        side = int(vision.get("image_size", 512)) // int(vision.get("patch_size", 16))
        seq_len = side * side // int(config.get("scale_factor", 2)) ** 2
        return image_only_smolvlm_processor_class()(images, tokenizer, image_seq_len=seq_len,
                                                    chat_template=chat_template(tokenizer))

    @classmethod
    def plain_prompt(cls, processor, question: str, n_images: int) -> str:
        token = getattr(processor, "image_token", "<image>")
        return f"User:{token * n_images}{question}<end_of_utterance>\nAssistant:"

    def language_model(self) -> nn.Module:
        return self.model.model.text_model

    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_model

    def vision_layers(self) -> list[nn.Module]:
        return list(self.vision_tower().encoder.layers)

    def projector(self) -> nn.Module:
        return self.model.model.connector

    @property
    def tile_side(self) -> int:
        """Tokens per side of one tile's grid: patches per side over the pixel-shuffle factor."""
        config = self.model.config
        vision = config.vision_config
        return int(vision.image_size) // int(vision.patch_size) // int(config.scale_factor)

    def image_grids(self, inputs) -> None:
        """Not one grid per image (see ``image_spans``)."""
        return None

    def image_spans(self, inputs, batch_index: int = 0) -> list[ImageSpan]:
        """A span per tile and per global image, in prompt order; an image ends with its global image.

        A run whose length is not one tile's grid (not this processor's layout) gets no grid.
        """
        ids = inputs["input_ids"][batch_index]
        runs = _token_runs(ids, self.image_token_id)
        if not runs:
            return []
        side = self.tile_side
        last_start = runs[-1][0]
        global_marker = int(ids[last_start - 1]) if last_start > 0 else None
        spans: list[ImageSpan] = []
        image, tiles = 0, 0
        for start, end in runs:
            is_global = start > 0 and int(ids[start - 1]) == global_marker
            grid = side if end - start == side * side else 0
            part = ("global" if tiles else "image") if is_global else "tile"
            spans.append(ImageSpan(image, start, end, grid, grid, start, part))
            tiles += 1
            if is_global:
                image, tiles = image + 1, 0
        return spans
