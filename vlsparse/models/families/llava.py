"""The LLaVA family: LLaVA 1.5, LLaVA-NeXT and LLaVA-OneVision.

A CLIP/SigLIP vision tower (``model.vision_tower``), a multi-modal projector
(``model.multi_modal_projector``) and a Llama-style language model. Each image
becomes a run of ``<image>`` tokens; for plain LLaVA (one fixed-size crop) the run
is the tower's patch grid, preceded by the CLS token when
``vision_feature_select_strategy`` is ``full``. NeXT and OneVision tile images
any-res, so their spans carry no grid.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from vlsparse.models.families.base import VisionLanguageAdapter


class LlavaAdapter(VisionLanguageAdapter):
    """LLaVA (1.5, NeXT, OneVision): vision tower + projector + Llama-style LM."""

    family: ClassVar[str] = "llava"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("llava", "llava_next", "llava_onevision")
    SUPPORTED: ClassVar[str] = "LLaVA (llava, llava_next, llava_onevision)"

    @classmethod
    def plain_prompt(cls, processor, question: str, n_images: int) -> str:
        token = getattr(processor, "image_token", "<image>")
        return "USER: " + "".join(f"{token}\n" for _ in range(n_images)) + f"{question} ASSISTANT:"

    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def vision_layers(self) -> list[nn.Module]:
        tower = self.vision_tower()
        inner = getattr(tower, "vision_model", tower)
        return list(inner.encoder.layers)

    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def image_grids(self, inputs) -> list[tuple[int, int, int, int]] | None:
        """One square patch grid per image for plain LLaVA; None for the any-res types.

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
