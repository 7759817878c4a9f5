"""The vision tower's [CLS] attention per image token, for VisionZip (and ToDRE's pivot).

VisionZip ranks the image tokens by the attention the vision tower's [CLS] token pays
them at the layer whose output feeds the projector. Here that layer's attention module
gets an observer (``vlsparse.kernels.runtime.OBSERVER_ATTR``; the model runs the
``"vlsparse"`` attention, SDPA underneath), which computes, per image, the [CLS] row of
the softmax ``q_cls k^T * scale`` summed over heads (the reference's
``attn_weights[:, :, 0, 1:].sum(dim=1)``) and the feature layer's keys averaged over
heads (the reference's merge metric). ``VisionCapture.per_token`` lines them up with the
prompt's image tokens.

``generate`` encodes the images BEFORE the first forward of the model (it passes
``mm_encoder_outputs``), so a capture is not tied to a prompt's start: each vision call
replaces it, and the runtime clears it once a prompt has used it (or starts decoding).

Supported: LLaVA (``model_type`` ``llava``) with a CLIP tower, whose first token is [CLS],
and an integer ``vision_feature_layer``. ``vision_source`` names what is missing otherwise
(Qwen2-VL's ViT has no [CLS]; LLaVA-NeXT/OneVision tile images any-res).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class VisionCapture:
    """The latest vision-tower call: [CLS] attention [B, T] and mean keys [B, T, d] (B images)."""

    strategy: str = "default"
    attention: list[Tensor] = field(default_factory=list)
    keys: list[Tensor] = field(default_factory=list)

    def clear(self) -> None:
        self.attention.clear()
        self.keys.clear()

    def per_token(self, n_image: int) -> tuple[Tensor | None, Tensor | None]:
        """([n_image] [CLS] attention, [n_image, d] keys) in prompt order, or (None, None) if they do not line up."""
        if not self.attention:
            return None, None
        start = 1 if self.strategy == "default" else 0  # "default" drops the [CLS] token before the projector
        attention = torch.cat([a[:, start:] for a in self.attention]).flatten()
        keys = torch.cat([k[:, start:] for k in self.keys]).flatten(0, 1)
        if attention.numel() != n_image:
            return None, None
        return attention, keys


def vision_source(loaded) -> tuple[object | None, str]:
    """(attention module of the vision layer feeding the projector, ``vision_feature_select_strategy``),
    or (None, what is missing)."""
    adapter, config = loaded.adapter, loaded.model.config
    if getattr(config, "model_type", None) != "llava":
        return None, (f"the vision tower's [CLS] attention, which vlsparse reads only from a LLaVA CLIP tower "
                      f"(this model is {getattr(config, 'model_type', 'unknown')})")
    vision = getattr(config, "vision_config", None)
    if getattr(vision, "model_type", None) != "clip_vision_model":
        return None, "a [CLS] token in the vision tower (this LLaVA's tower is not CLIP)"
    feature_layer = getattr(config, "vision_feature_layer", -2)
    layers = adapter.vision_layers()
    if not isinstance(feature_layer, int) or isinstance(feature_layer, bool):
        return None, "a single vision feature layer (this LLaVA concatenates several)"
    index = (feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer) - 1  # hidden_states[h]
    if not 0 <= index < len(layers):                                                   # = output of layer h-1
        return None, f"a vision layer behind vision_feature_layer {feature_layer}"
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    return adapter.attention(layers[index]), str(strategy)


def vision_observer(capture: VisionCapture, active):
    """An attention observer filling ``capture`` while ``active()`` is true."""

    def observe(module, query, key, attention_mask, kwargs) -> None:
        if not active():
            return
        scale = kwargs.get("scaling") or getattr(module, "scale", None) or query.shape[-1] ** -0.5
        kf = key.float()
        if kf.shape[1] != query.shape[1]:  # grouped keys: each query head reads its group's key head
            kf = kf.repeat_interleave(query.shape[1] // kf.shape[1], dim=1)
        cls = query[:, :, :1].float() @ kf.transpose(-1, -2) * scale  # [B, H, 1, T]
        capture.attention[:] = [torch.softmax(cls, dim=-1)[:, :, 0].sum(dim=1)]
        capture.keys[:] = [key.float().mean(dim=1)]

    return observe


__all__ = ["VisionCapture", "vision_observer", "vision_source"]
