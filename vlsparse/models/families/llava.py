"""The LLaVA family: LLaVA 1.5, LLaVA-NeXT and LLaVA-OneVision.

A CLIP/SigLIP vision tower (``model.vision_tower``), a multi-modal projector
(``model.multi_modal_projector``) and a Llama-style language model. Each image
becomes a run of ``<image>`` tokens; for plain LLaVA (one fixed-size crop) the run
is the tower's patch grid, preceded by the CLS token when
``vision_feature_select_strategy`` is ``full``.

NeXT and OneVision tile images any-res: an image's run is its base image (the tower's
``side`` x ``side`` grid on the whole image) followed by its crops stitched into one grid
(the pinpoint resolution that fits ``image_sizes`` best, cut into ``image_size`` crops),
cropped back to the image's aspect ratio, with a newline token ending each row (OneVision
then shrinks grids above ``anyres_max_N`` crops' worth). From ``image_sizes`` and the
config's ``image_grid_pinpoints`` each image gets two spans: ``"base"`` (its grid) and
``"anyres"`` (``cols`` counts the newline column). Without ``image_sizes`` (or when the
counts disagree with the prompt) each run of image tokens is one span without a grid.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

from vlsparse.models.families.base import ImageSpan, VisionLanguageAdapter, image_only_processor


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The (height, width) among ``pinpoints`` that keeps most of an image's pixels when it is
    scaled to fit, then wastes the least (the first on a tie)."""
    best, best_key = None, None
    for pin_height, pin_width in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        key = (kept, -(pin_height * pin_width - kept))
        if best_key is None or key > best_key:
            best, best_key = (int(pin_height), int(pin_width)), key
    return best


def anyres_shape(height: int, width: int, pinpoints, tile: int, side: int, max_crops: int | None) -> tuple[int, int]:
    """(rows, cols) of an image's stitched any-res grid (before the newline column): the best pinpoint's
    crops of ``tile`` pixels, ``side`` tokens each way, cropped back to the image's aspect ratio, then
    shrunk when above ``max_crops`` crops' worth of tokens (OneVision's ``anyres_max_N``)."""
    pin_height, pin_width = best_resolution(height, width, pinpoints)
    rows, cols = pin_height // tile * side, pin_width // tile * side
    if width / height > cols / rows:
        padding = (rows - int(round(height * (cols / width), 7))) // 2
        rows -= 2 * padding
    else:
        padding = (cols - int(round(width * (rows / height), 7))) // 2
        cols -= 2 * padding
    if max_crops is not None:
        ratio = math.sqrt(rows * cols / (max_crops * side * side))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return rows, cols


class LlavaAdapter(VisionLanguageAdapter):
    """LLaVA (1.5, NeXT, OneVision): vision tower + projector + Llama-style LM."""

    family: ClassVar[str] = "llava"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("llava", "llava_next", "llava_onevision")
    SUPPORTED: ClassVar[str] = "LLaVA (llava, llava_next, llava_onevision)"

    @classmethod
    def read_processor(cls, folder: Path, trust_remote_code: bool):
        """The saved processor; OneVision's without its video half when that wants torchvision."""
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except ImportError:
            if json.loads((Path(folder) / "config.json").read_text()).get("model_type") != "llava_onevision":
                raise
        saved = Path(folder) / "processor_config.json"
        settings = json.loads(saved.read_text()) if saved.is_file() else {}
        keep = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "image_token")
        return image_only_processor(folder, "LlavaOnevisionProcessor", "LlavaOnevision", trust_remote_code,
                                    **{k: settings[k] for k in keep if k in settings})

    @classmethod
    def plain_prompt(cls, processor, question: str, n_images: int) -> str:
        token = getattr(processor, "image_token", "<image>")
        return "USER: " + "".join(f"{token}\n" for _ in range(n_images)) + f"{question} ASSISTANT:"

    def image_spans(self, inputs, batch_index: int = 0) -> list[ImageSpan]:
        """Plain LLaVA: see ``VisionLanguageAdapter``; NeXT/OneVision: a base and an any-res span per image."""
        layouts = self.anyres_layouts(inputs)
        ids = inputs["input_ids"][batch_index]
        positions = (ids == self.image_token_id).nonzero().flatten().tolist()
        if layouts is None or sum(b * b + r * (c + 1) for b, r, c in layouts) != len(positions):
            return super().image_spans(inputs, batch_index)
        spans, offset = [], 0
        for index, (base, rows, cols) in enumerate(layouts):
            start = positions[offset]
            middle = start + base * base
            end = middle + rows * (cols + 1)
            if positions[offset + base * base + rows * (cols + 1) - 1] != end - 1:  # not one run: not this layout
                return super().image_spans(inputs, batch_index)
            spans += [ImageSpan(index, start, middle, base, base, start, "base"),
                      ImageSpan(index, middle, end, rows, cols + 1, middle, "anyres")]
            offset += base * base + rows * (cols + 1)
        return spans

    def anyres_layouts(self, inputs) -> list[tuple[int, int, int]] | None:
        """Per image of a NeXT/OneVision prompt: (base grid side, any-res rows, any-res cols without the
        newline column), from ``image_sizes``; None for plain LLaVA or without ``image_sizes``."""
        config = self.model.config
        sizes = inputs.get("image_sizes") if hasattr(inputs, "get") else None
        if getattr(config, "model_type", "llava") == "llava" or sizes is None:
            return None
        vision = config.vision_config
        tile, side = int(vision.image_size), int(vision.image_size) // int(vision.patch_size)
        aspect = getattr(config, "vision_aspect_ratio", None) if config.model_type == "llava_onevision" else None
        max_crops = int(aspect.removeprefix("anyres_max_")) if aspect and aspect.startswith("anyres_max_") else None
        return [(side, *anyres_shape(int(h), int(w), config.image_grid_pinpoints, tile, side, max_crops))
                for h, w in sizes.tolist()]

    def image_grids(self, inputs) -> list[tuple[int, int, int, int]] | None:
        """One square patch grid per image for plain LLaVA; None for the any-res types (``anyres_layouts``).

        The image count is ``pixel_values``' batch; without it (``generate`` encodes the images
        before the first forward and leaves them out) the image tokens over one image's count.
        """
        config = self.model.config
        if getattr(config, "model_type", "llava") != "llava":
            return None
        vision = config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        extra = 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0
        if "pixel_values" in inputs and inputs["pixel_values"] is not None:
            count = int(inputs["pixel_values"].shape[0])
        elif inputs.get("input_ids") is not None and self.image_token_id is not None:
            tokens = int((inputs["input_ids"][0] == self.image_token_id).sum())
            if not tokens or tokens % (extra + side * side):
                return None
            count = tokens // (extra + side * side)
        else:
            return None
        return [(extra, side, side, 1)] * count
