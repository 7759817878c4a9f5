"""The InternVL family (``internvl``): transformers' native ``InternVLForConditionalGeneration``.

An InternViT (``model.vision_tower``, blocks in ``vision_tower.encoder.layer``), a
multi-modal projector (``model.multi_modal_projector``) and a Qwen2/Llama-style language
model. The processor cuts an image into tiles of ``image_size`` pixels (up to
``max_patches``, plus a thumbnail when there are several); each tile's ``s x s`` patches
are pixel-shuffled by ``downsample_ratio`` r into ``(s r) x (s r)`` tokens, raster order,
so a tile is ``image_seq_length`` ``<IMG_CONTEXT>`` tokens and an image is
``<img>`` + tiles x ``image_seq_length`` ``<IMG_CONTEXT>`` + ``</img>``. A one-tile image is
one span with that grid; a tiled image is not one grid (its crops follow each other in rows of
the arrangement the processor chose, which the inputs do not record, then the thumbnail), so it
is one span per tile, each with the tile's grid (``part`` ``"tile"``, then ``"global"`` for the
thumbnail). The processor is loaded without its video half when torchvision is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from torch import nn

from vlsparse.models.families.base import (ImageSpan, VisionLanguageAdapter, image_only_processor, tokenizer_of,
                                           torchvision_available, true_runs)


def saved_image_seq_length(folder: Path) -> int | None:
    """``image_seq_length`` as the folder's processor_config.json, else config.json, records it."""
    for name in ("processor_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file():
            value = json.loads(path.read_text()).get("image_seq_length")
            if value is not None:
                return int(value)
    return None


class InternVLAdapter(VisionLanguageAdapter):
    """InternVL (transformers-native): InternViT + pixel shuffle + MLP projector + Qwen2/Llama LM."""

    family: ClassVar[str] = "internvl"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("internvl",)
    SUPPORTED: ClassVar[str] = "InternVL"

    @classmethod
    def read_processor(cls, folder: Path, trust_remote_code: bool):
        from transformers import AutoProcessor

        if torchvision_available():
            return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        settings = {}  # without torchvision: the processor without its video half
        length = saved_image_seq_length(folder)
        if length is not None:
            settings["image_seq_length"] = length
        return image_only_processor(folder, "InternVLProcessor", "GotOcr2", trust_remote_code, **settings)

    @classmethod
    def plain_prompt(cls, processor, question: str, n_images: int) -> str:
        images = f"{processor.image_token}\n" * n_images
        if "<|im_start|>" in tokenizer_of(processor).get_vocab():
            return f"<|im_start|>user\n{images}{question}<|im_end|>\n<|im_start|>assistant\n"
        return f"{images}{question}"

    def vision_layers(self) -> list[nn.Module]:
        return list(self.vision_tower().encoder.layer)

    @property
    def tile_side(self) -> int:
        """Tokens along each side of a tile after pixel shuffle."""
        config = self.model.config
        patches = int(config.vision_config.image_size[0]) // int(config.vision_config.patch_size[0])
        return int(patches * float(config.downsample_ratio))

    @property
    def tile_tokens(self) -> int:
        """Image tokens per tile (``image_seq_length``)."""
        return int(getattr(self.model.config, "image_seq_length", None) or self.tile_side ** 2)

    def tile_grids(self, ids) -> list[tuple[int, int, int, int]] | None:
        """Per run of image tokens in ``ids`` (one image, between ``<img>`` and ``</img>``):
        (0, tile rows, tile cols, tiles); None if a run is not whole tiles."""
        side, grids = self.tile_side, []
        for start, end in true_runs(ids == self.image_token_id):
            tiles, rest = divmod(end - start, self.tile_tokens)
            if rest or not tiles or side * side != self.tile_tokens:
                return None
            grids.append((0, side, side, tiles))
        return grids

    def image_grids(self, inputs) -> list[tuple[int, int, int, int]] | None:
        """``tile_grids`` of the first prompt (an image's tiles count as its frames)."""
        return self.tile_grids(inputs["input_ids"][0])

    def image_spans(self, inputs, batch_index: int = 0) -> list[ImageSpan]:
        """Per image: one span with the tile's grid when it is one tile, else one span per tile, each its
        grid: the crops (``part`` ``"tile"``, in rows of the arrangement), then the thumbnail (``"global"``).
        Tokens that are not whole tiles: one span per image, without a grid."""
        ids = inputs["input_ids"][batch_index]
        side, per_tile = self.tile_side, self.tile_tokens
        runs = true_runs(ids == self.image_token_id)
        if self.tile_grids(ids) is None:
            return [ImageSpan(index, start, end, 0, 0, start) for index, (start, end) in enumerate(runs)]
        spans = []
        for index, (start, end) in enumerate(runs):
            tiles = (end - start) // per_tile
            if tiles == 1:
                spans.append(ImageSpan(index, start, end, side, side, start))
                continue
            for tile in range(tiles):
                first = start + tile * per_tile
                part = "global" if tile == tiles - 1 else "tile"
                spans.append(ImageSpan(index, first, first + per_tile, side, side, first, part))
        return spans
