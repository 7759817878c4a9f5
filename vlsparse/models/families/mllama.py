"""The Mllama family: Llama 3.2 Vision.

A tiled vision tower (``model.vision_model``: a local encoder ``transformer.layers`` then
a gated global encoder ``global_transformer.layers``), a linear projector
(``model.multi_modal_projector``) and a language model (``model.language_model``) whose
layers are self-attention decoder layers except those listed in
``text_config.cross_attention_layers``, which attend from the text to the projected image
features (``cross_attn``) instead.

The images are not tokens of the language model's sequence: each image is one
``<|image|>`` token in the prompt, and its features enter only through the cross-attention
layers. So image spans are empty; profiles and the sparse runtime cover the
self-attention layers (the cross-attention layers are recorded dense); pruning covers both
kinds of layer (cross-attention projections included) and core neurons every layer's MLP;
token reduction and core tokens do not apply (there are no image tokens to drop).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from vlsparse.models.families.base import ImageSpan, VisionLanguageAdapter


class MllamaAdapter(VisionLanguageAdapter):
    """Mllama (Llama 3.2 Vision): tiled tower + projector + LM with interleaved cross-attention layers."""

    family: ClassVar[str] = "mllama"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("mllama",)
    SUPPORTED: ClassVar[str] = "Mllama (Llama 3.2 Vision)"
    image_tokens: ClassVar[bool] = False

    @classmethod
    def plain_prompt(cls, processor, question: str, n_images: int) -> str:
        token = getattr(processor, "image_token", "<|image|>")
        return f"{token * n_images}{question}"

    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_model

    def vision_layers(self) -> list[nn.Module]:
        """The local encoder's layers, then the global encoder's."""
        tower = self.vision_tower()
        return list(tower.transformer.layers) + list(tower.global_transformer.layers)

    @staticmethod
    def attention(layer: nn.Module) -> nn.Module:
        """The self-attention of a self-attention layer, the cross-attention of a cross-attention layer."""
        return layer.self_attn if hasattr(layer, "self_attn") else layer.cross_attn

    def self_attention(self, layer: nn.Module) -> nn.Module | None:
        return getattr(layer, "self_attn", None)

    def cross_attention_layers(self) -> list[int]:
        """Indexes of the language layers that attend to the image features."""
        return sorted(int(i) for i in self.text_config.cross_attention_layers)

    def image_grids(self, inputs) -> None:
        return None

    def image_spans(self, inputs, batch_index: int = 0) -> list[ImageSpan]:
        """None: an ``<|image|>`` token marks where an image was given, its features are not in the sequence."""
        return []
