"""Capture each language layer's post-RoPE queries and keys through transformers' attention registry.

No copied model forward: a function is registered with
``transformers.AttentionInterface`` and the model is switched to it for the
duration of a ``with`` block. For the attention modules of the language
decoder it hands ``(layer, query, key, scaling)`` to a callback, then every
module (vision tower included) gets the real output from transformers' own
SDPA function, so the forward computes exactly what ``sdpa`` computes.
Queries and keys arrive rotated (multimodal RoPE included) and, for GQA,
keys are not repeated: ``query`` is ``[B, H, N, d]``, ``key`` ``[B, H_kv, N, d]``.

The same name is registered with ``AttentionMaskInterface`` as SDPA's mask
function, so the model builds the masks it builds for ``sdpa`` (none at all
for an unpadded causal prompt).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from vlsparse.compat import attention_scale, register_attention, sdpa_attention
from vlsparse.kernels.runtime import off_causal_rows

CAPTURE_NAME = "vlsparse_capture"

LayerCallback = Callable[[int, torch.Tensor, torch.Tensor, float], None]
"""``callback(layer, query [B, H, N, d], key [B, H_kv, N, d], scaling)``."""

MaskCallback = Callable[[int, int, int], None]
"""``on_mask(layer, rows, n)``: ``rows`` of the ``n`` query rows whose mask row is not the causal row
(a sliding window shorter than the prompt, bidirectional image or prefix tokens, padding)."""


def _implementations(config) -> str | dict:
    """The attention implementation of ``config`` and its sub-configs, in ``set_attn_implementation``'s format."""
    subs = {}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            subs[key] = _implementations(sub)
    own = getattr(config, "_attn_implementation", None) or "sdpa"
    return {"": own, **subs} if subs else own


@contextlib.contextmanager
def capture_attention(model: nn.Module, modules: Sequence[nn.Module], callback: LayerCallback,
                      name: str = CAPTURE_NAME, on_mask: MaskCallback | None = None) -> Iterator[None]:
    """Within the block, every forward of ``model`` calls ``callback`` once per module in ``modules``.

    ``modules`` are the language layers' attention modules in layer order (None for a layer
    whose attention is not captured); the callback receives the position in that list as the
    layer index. ``on_mask``, if given, hears how many query rows the model's mask keeps off
    causal in each such call.
    The model's previous attention implementation is restored on exit.
    """
    index = {id(m): i for i, m in enumerate(modules) if m is not None}

    def attention(module, query, key, value, attention_mask, **kwargs):
        layer = index.get(id(module))
        if layer is not None and query.shape[-2] > 1:
            callback(layer, query, key, attention_scale(module, query, kwargs))
            if on_mask is not None:
                on_mask(layer, int(off_causal_rows(attention_mask, query.shape[-2]).sum()), query.shape[-2])
        return sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    previous = _implementations(model.config)
    register_attention(name, attention)
    try:
        model.set_attn_implementation(name)
        yield
    finally:
        model.set_attn_implementation(previous)
        register_attention(name, sdpa_attention)  # drop the closure (and what it holds)
