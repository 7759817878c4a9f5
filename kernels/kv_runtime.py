"""KV cache methods at run time: vlsparse's cache layers in the cache ``generate`` makes.

``attach_kv(loaded, settings)`` (``settings``: ``vlsparse.profile.kv.KVSettings``) adds a forward
pre-hook to the model: at each prefill (an empty ``DynamicCache``) it puts a vlsparse layer in place
of every full-attention layer of that cache (``compat.replace_full_attention_layers``):
``InPlaceLayer`` for ``fp``, else a ``CompressedLayer`` with the method (``vlsparse.kv.cache``).
Sliding-window layers, layers attending elsewhere (Mllama's cross-attention, whose cache holds the
image), a static or quantised cache from the caller, and calls without a cache are left as they are.

Compressed layers hand the attention function a ``KVHandle``; the ``"vlsparse"`` attention function
(``vlsparse.kernels.runtime``) passes it to ``vlsparse.kv.cache.attend_handle``: at prefill, the attention runs on the
prompt's own keys and values (sparse where a profile says so), then the layer plans and compresses
with the prompt's queries; at decode, the layer's store answers (``CompressedStore.attend``, block by
block). The model runs the ``"vlsparse"`` attention while attached.

The prompt's image positions come from the adapter at each prefill; with token reduction attached
(``token_drop``), a layer sees the image mask of the tokens it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from vlsparse import compat
from vlsparse.compat import cache_length, cache_of_call
from vlsparse.kernels.runtime import ATTENTION_NAME, KV_ATTR, RUNTIME_ATTR, observed, register_attention
from vlsparse.kernels.token_drop import span_mask
from vlsparse.kv import method_named
from vlsparse.kv.cache import CompressedLayer, InPlaceLayer


@dataclass
class KVRuntime:
    """State of one model's KV method: its settings and the layers of the latest prompt's cache."""

    method: str
    params: dict[str, Any]
    token_drop: Any = None
    image_mask: Tensor | None = None
    layers: list = field(default_factory=list)
    handles: list = field(default_factory=list, repr=False)
    original_attention: str | None = None

    def current_image_mask(self, length: int) -> Tensor | None:
        """Image positions [length] of the sequence a layer holds now, or None if unknown."""
        if self.token_drop is not None:
            mask = self.token_drop.current_image_mask()
            if mask is not None and mask.numel() == length:
                return mask
        if self.image_mask is not None and self.image_mask.numel() == length:
            return self.image_mask
        return None

    def make_layer(self, index: int):
        if self.method == "fp":
            return InPlaceLayer()
        return CompressedLayer(method_named(self.method), self.params, self.current_image_mask)

    def stats(self) -> dict[str, Any]:
        """The latest prompt's cache: bytes held, tokens held and kept at high bits, summed over layers."""
        plans = [layer.plan_summary for layer in self.layers if getattr(layer, "plan_summary", None)]
        out: dict[str, Any] = {"kv_method": self.method,
                               "kv_held_bytes": sum(layer.held_nbytes() for layer in self.layers)}
        if plans:
            out.update(kv_prompt_tokens=sum(p["prompt"] for p in plans), kv_kept_tokens=sum(p["kept"] for p in plans),
                       kv_high_tokens=sum(p["high"] for p in plans))
        return out


def _prefill_hook(runtime: KVRuntime, adapter, num_layers: int, self_attention: set[int]):
    def hook(module, args, kwargs):
        cache = cache_of_call(kwargs)
        ids = kwargs.get("input_ids")
        if cache is None or cache_length(cache):
            return None
        runtime.image_mask = None
        if adapter.is_vlm and ids is not None and ids.shape[0] == 1:
            runtime.image_mask = span_mask(adapter.image_spans(kwargs), ids.shape[-1])
        runtime.layers = []

        def make(index: int):
            layer = runtime.make_layer(index)
            runtime.layers.append(layer)
            return layer

        compat.replace_full_attention_layers(cache, make, num_layers, only=self_attention)
        return None

    return hook


def attach_kv(loaded, settings, token_runtime=None) -> KVRuntime:
    """Run ``settings``' KV method on ``loaded.model``'s generations; returns the runtime."""
    runtime = KVRuntime(method=settings.method, params=dict(settings.params),
                        token_drop=getattr(token_runtime, "drop", None))
    runtime.original_attention = compat.attn_implementation(loaded.model)
    register_attention()
    setattr(loaded.model, KV_ATTR, runtime)
    loaded.model.set_attn_implementation(ATTENTION_NAME)
    adapter = loaded.adapter
    self_attention = {i for i, layer in enumerate(adapter.lm_layers()) if adapter.self_attention(layer) is not None}
    hook = _prefill_hook(runtime, adapter, adapter.num_layers, self_attention)
    runtime.handles.append(loaded.model.register_forward_pre_hook(hook, with_kwargs=True))
    return runtime


def detach_kv(loaded, runtime: KVRuntime) -> None:
    """Generations use transformers' own cache again; the attention implementation is restored unless
    another vlsparse runtime still needs ``"vlsparse"``."""
    for handle in runtime.handles:
        handle.remove()
    runtime.handles.clear()
    if getattr(loaded.model, KV_ATTR, None) is runtime:
        delattr(loaded.model, KV_ATTR)
    sparse = any(getattr(m, RUNTIME_ATTR, None) is not None for m in loaded.model.modules())
    if not sparse and not observed(loaded.model):
        loaded.model.set_attn_implementation(runtime.original_attention or "sdpa")


__all__ = ["KV_ATTR", "KVRuntime", "attach_kv", "detach_kv"]
