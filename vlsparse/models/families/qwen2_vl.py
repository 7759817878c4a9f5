"""The Qwen2-VL family: Qwen2-VL and Qwen2.5-VL (same layout, two family names).

A ViT (``model.visual``, blocks in ``visual.blocks``) whose patch merger
(``visual.merger``) is the projector, and a Qwen2 language model with multimodal
RoPE. Each image becomes ``t * (h / m) * (w / m)`` ``<|image_pad|>`` tokens between
``<|vision_start|>`` and ``<|vision_end|>``, from the processor's
``image_grid_thw`` and the merge size ``m``. The processor is loaded without its
video half when that needs torchvision.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torch import nn

from vlsparse.compat import image_only_qwen2_vl_processor_class, pil_image_processor_class
from vlsparse.models.families.base import VisionLanguageAdapter


class Qwen2VLAdapter(VisionLanguageAdapter):
    """Qwen2-VL: ViT with patch merger + Qwen2 LM with multimodal RoPE."""

    family: ClassVar[str] = "qwen2_vl"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen2_vl",)
    SUPPORTED: ClassVar[str] = "Qwen2-VL"

    @classmethod
    def required_sub_configs(cls, config: dict) -> tuple[str, ...]:
        keys = super().required_sub_configs(config)
        if "hidden_size" in config:  # configs may keep the language model's settings at the top level
            keys = tuple(k for k in keys if k != "text_config")
        return keys

    @classmethod
    def read_processor(cls, folder: Path, trust_remote_code: bool):
        from transformers import AutoProcessor, AutoTokenizer

        try:
            return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except ImportError:  # the video processor wants torchvision: use the image-only subclass
            pass
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        image_processor = pil_image_processor_class("Qwen2VL").from_pretrained(folder)
        chat_template = getattr(tokenizer, "chat_template", None)
        return image_only_qwen2_vl_processor_class()(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def plain_prompt(cls, processor, question: str, n_images: int) -> str:
        image = "<|vision_start|><|image_pad|><|vision_end|>"
        return f"<|im_start|>user\n{image * n_images}{question}<|im_end|>\n<|im_start|>assistant\n"

    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    def vision_layers(self) -> list[nn.Module]:
        return list(self.vision_tower().blocks)

    def projector(self) -> nn.Module:
        return self.model.model.visual.merger

    def image_grids(self, inputs) -> list[tuple[int, int, int, int]] | None:
        """One (merged) grid per image from ``image_grid_thw``; None without it."""
        thw = inputs.get("image_grid_thw")
        if thw is None:
            return None
        merge = int(getattr(self.model.config.vision_config, "spatial_merge_size", 2))
        return [(0, int(h) // merge, int(w) // merge, int(t)) for t, h, w in thw.tolist()]


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: Qwen2-VL's layout (windowed vision attention, SwiGLU vision MLP inside)."""

    family: ClassVar[str] = "qwen2_5_vl"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen2_5_vl",)
    SUPPORTED: ClassVar[str] = "Qwen2.5-VL"
