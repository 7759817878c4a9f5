"""The sparse runtime: a profile plugged into transformers' attention registry.

``attach(loaded, profile)`` registers the attention function ``"vlsparse"``
(``AttentionInterface.register``) and switches the model to it. No model
forward is copied: transformers hands the function post-RoPE queries and keys
(multimodal RoPE included for Qwen2-VL), K/V not repeated for GQA, and the
module (``module.layer_idx`` picks the profile's layer).

Per call: a language-layer **prefill** (query length = key length, at least
``min_len`` tokens, no attention soft-capping) follows the profile unless its
heads' recorded densities average above ``dense_above`` (then SDPA is faster: the
CPU path reaches about half of the ideal 1/density speedup, so near-dense layers lose),
building that layer's index lists from the input (``layer_index``) and
running the sparse kernel of the chosen backend; everything else (decode
steps, vision tower, short prompts) runs dense SDPA. The kernels are causal, so
query rows whose mask row is not the causal row (padding, a sliding window shorter
than the prompt, Gemma 3's bidirectional image blocks, PaliGemma's bidirectional
prefix) run dense under the model's own mask (the whole layer when they are over
half the rows); sparse rows thus never reach a key the model masks. Image spans
of the current prompt come from a forward pre-hook on the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vlsparse import compat
from vlsparse.compat import sdpa_attention
from vlsparse.profile import Profile, check_profile_matches

ATTENTION_NAME = "vlsparse"
RUNTIME_ATTR = "vlsparse_runtime"
KV_ATTR = "vlsparse_kv_runtime"  # a model's KV cache method (``vlsparse.kernels.kv_runtime``)
OBSERVER_ATTR = "vlsparse_observer"
"""An attention module's observer: ``observer(module, query, key, attention_mask, kwargs)`` is called with the
post-RoPE query [B, H, N, D] and key [B, Hkv, N, D] of every call (``vlsparse.kernels.token_runtime`` scores
tokens with it); it must not change them."""


@dataclass
class LayerCall:
    """One prefill call of a language layer: its index lists (None when it ran dense).

    ``density`` (kept fraction of causal pairs) is computed on demand, for summaries,
    so timing a prefill does not pay for it.
    """

    layer: int
    tokens: int
    index: Any = None
    fallback: list[int] = field(default_factory=list)  # query heads the recall guard ran dense for this prompt

    @property
    def density(self) -> float:
        if self.index is None:
            return 1.0
        from vlsparse.kernels.indices import index_density

        density = index_density(self.index, self.tokens)
        density[:, self.fallback] = 1.0  # heads the recall guard ran dense
        return float(density.mean())


@dataclass
class SparseRuntime:
    """State shared by the language layers of one model: the profile and the current prompt."""

    profile: Profile
    backend: str = "auto"
    min_len: int = 512
    dense_above: float = 0.5
    enabled: bool = True
    guard: bool = False  # the recall guard (``vlsparse.kernels.recall_guard``)
    spans: list[tuple[int, int]] = field(default_factory=list)
    calls: list[LayerCall] = field(default_factory=list)
    handles: list = field(default_factory=list, repr=False)

    def heads(self, layer: int):
        return self.profile.attention.layers[layer]

    def fallbacks(self) -> tuple[int, int]:
        """(heads the recall guard ran dense, heads that could have run sparse) over the latest prompt."""
        sparse_calls = [c for c in self.calls if c.index is not None]
        return sum(len(c.fallback) for c in sparse_calls), sum(len(self.heads(c.layer)) for c in sparse_calls)

    def mean_density(self) -> float | None:
        """Mean kept fraction over the latest prompt's prefill calls (all-dense layers count 1), or None."""
        if not self.calls:
            return None
        return sum(c.density for c in self.calls) / len(self.calls)


def _dense(module, query, key, value, attention_mask, **kwargs):
    if (query.shape[2] == 1 and attention_mask is None and kwargs.get("softcap") is None
            and kwargs.get("s_aux") is None and getattr(module, "sinks", None) is None
            and not getattr(module, "training", False)):  # a plain decode step that sees every held key
        scale = compat.attention_scale(module, query, kwargs)
        return decode_attention(query, key, value, scale), None
    return sdpa_attention(module, query, key, value, attention_mask, **kwargs)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """One query row per head over every key: query [B, H, 1, D], key/value [B, Hkv, N, D] (GQA: query head ``h``
    reads KV head ``h // (H / Hkv)``, nothing repeated) -> [B, 1, H, D] like SDPA's output. Two batched
    matmuls: on CPU about half of SDPA's time for a decode step, which repeats K/V or takes its slower GQA path."""
    b, h, _, d = query.shape
    heads = key.shape[1]
    q = query.reshape(b, heads, h // heads, d)
    weights = torch.softmax((q @ key.transpose(-1, -2)).mul_(scale), -1)
    return (weights @ value).reshape(b, 1, h, d)


def _is_sparse_prefill(runtime: SparseRuntime, module, query, key, attention_mask, kwargs: dict) -> bool:
    """A prefill the kernels may run: long enough, no soft-capping (the kernels do not cap) and, without a
    mask, causal with no sliding window shorter than the prompt (rows of a mask are checked by ``off_causal_rows``)."""
    if not runtime.enabled or runtime.profile.attention is None:
        return False
    n = query.shape[2]
    if n != key.shape[2] or n < max(runtime.min_len, 1) or kwargs.get("softcap") is not None:
        return False
    if attention_mask is not None:
        return True
    window = kwargs.get("sliding_window")
    return getattr(module, "is_causal", True) and (window is None or n <= window)


def off_causal_rows(mask: torch.Tensor | None, n: int) -> torch.Tensor:
    """Boolean [n]: query rows whose mask row is not the causal row in some batch entry or head.

    Padding, a sliding window cutting the row, bidirectional image blocks (Gemma 3) or a
    bidirectional prefix (PaliGemma) put a row here; the kernels' causality only holds on the others.
    """
    if mask is None:
        return torch.zeros(n, dtype=torch.bool)
    if mask.dim() != 4 or mask.shape[-1] != n or mask.shape[-2] != n:
        return torch.ones(n, dtype=torch.bool)
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    keep = mask if mask.dtype == torch.bool else mask == 0
    return (keep != causal).any(-1).flatten(0, -2).any(0).cpu()


def vlsparse_attention(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """Registered as ``"vlsparse"``: sparse prefill where the profile says so, SDPA elsewhere.

    query: [B, H, N, D]; key, value: [B, Hkv, N, D]; returns ([B, N, H, D], None) like SDPA.
    A module's observer (``OBSERVER_ATTR``), if any, sees query and key first. A compressed KV
    cache's handle in place of ``key`` goes to ``vlsparse.kv.cache.attend_handle``.
    """
    if not isinstance(key, torch.Tensor):
        from vlsparse.kv.cache import attend_handle

        return attend_handle(module, query, key, value, attention_mask, _attention, **kwargs)
    return _attention(module, query, key, value, attention_mask, **kwargs)


def _attention(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    observer = getattr(module, OBSERVER_ATTR, None)
    if observer is not None:
        observer(module, query, key, attention_mask, kwargs)
    runtime: SparseRuntime | None = getattr(module, RUNTIME_ATTR, None)
    layer = getattr(module, "layer_idx", None)
    if runtime is None or layer is None or not _is_sparse_prefill(runtime, module, query, key, attention_mask,
                                                                  kwargs):
        return _dense(module, query, key, value, attention_mask, **kwargs)
    from vlsparse.kernels.dispatch import sparse_attention
    from vlsparse.kernels.indices import with_dense_tail
    from vlsparse.patterns.layer import layer_index

    heads = runtime.heads(layer)
    n = query.shape[2]
    scale = compat.attention_scale(module, query, kwargs)
    off_causal = off_causal_rows(attention_mask, n)
    if (all(h.pattern == "dense" for h in heads) or sum(h.density for h in heads) / len(heads) > runtime.dense_above
            or 2 * int(off_causal.sum()) > n):  # sparse rows the dense ones would overwrite: no gain
        runtime.calls.append(LayerCall(layer, n))
        return _dense(module, query, key, value, attention_mask, **kwargs)
    att = runtime.profile.attention
    index = layer_index(heads, query, key, scale=scale, spans=runtime.spans, masks=runtime.profile.tensors,
                        block_size=att.block_size, last_q=att.last_q)
    fallback: list[int] = []
    if runtime.guard:  # heads whose lists miss too much of this prompt's last-block attention run dense
        from vlsparse.kernels.recall_guard import head_targets, heads_to_fall_back, last_block_recall

        fallback = heads_to_fall_back(last_block_recall(query, key, index, scale), head_targets(att, heads))
    if att.dense_tail:
        index = with_dense_tail(index, n)
    runtime.calls.append(LayerCall(layer, n, index, fallback))
    out = sparse_attention(query, key, value, index, scale, backend=runtime.backend).transpose(1, 2).contiguous()
    if fallback:
        from vlsparse.kernels.recall_guard import dense_heads

        out[:, :, fallback] = dense_heads(query, key, value, fallback, scale, attention_mask).transpose(1, 2)
    if off_causal.any():  # those rows run as the model runs them: dense, under its own mask
        rows = off_causal.nonzero().flatten().to(query.device)
        out[:, rows] = _dense(module, query[:, :, rows], key, value, attention_mask[:, :, rows], **kwargs)[0]
    return out, None


def register_attention() -> None:
    """Register ``"vlsparse"`` in transformers' attention registry (idempotent)."""
    compat.register_attention(ATTENTION_NAME, vlsparse_attention)


def _prefill_hook(runtime: SparseRuntime, adapter):
    """Forward pre-hook: at each prefill, forget the previous prompt's calls and note the image spans."""

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[-1] > 1:
            runtime.calls.clear()  # calls describe the latest prompt only (they hold its index lists)
            if adapter.is_vlm:
                runtime.spans = [(s.start, s.end) for s in adapter.image_spans(kwargs)]
        return None

    return hook


def attach(loaded, profile: Profile, backend: str = "auto", min_len: int = 512,
           dense_above: float = 0.5, guard: bool = False) -> SparseRuntime:
    """Make ``loaded.model`` run its language-layer prefills with ``profile``; returns the runtime.

    Checks that the profile was made for this model (one-line ``ProfileError`` otherwise).
    """
    check_profile_matches(profile, loaded.adapter.fingerprint())
    from vlsparse.kernels.dispatch import BACKENDS

    if backend not in BACKENDS:
        from vlsparse.errors import InputError

        raise InputError(f"unknown backend {backend!r}", f"choose one of {', '.join(BACKENDS)}")
    runtime = SparseRuntime(profile=profile, backend=backend, min_len=min_len, dense_above=dense_above, guard=guard)
    register_attention()
    for layer in loaded.adapter.lm_layers():
        module = loaded.adapter.self_attention(layer)  # None: a layer attending elsewhere (Mllama) stays dense
        if module is not None:
            setattr(module, RUNTIME_ATTR, runtime)
    loaded.model.set_attn_implementation(ATTENTION_NAME)
    runtime.handles.append(loaded.model.register_forward_pre_hook(_prefill_hook(runtime, loaded.adapter),
                                                                  with_kwargs=True))
    return runtime


def set_enabled(loaded, runtime: SparseRuntime, enabled: bool) -> None:
    """Switch an attached runtime off (stock SDPA) or back on, e.g. to take turns with dense.

    While some attention module has an observer (token scoring), the model stays on ``"vlsparse"``,
    which runs SDPA for a disabled runtime.
    """
    runtime.enabled = enabled
    loaded.model.set_attn_implementation(ATTENTION_NAME if enabled or observed(loaded.model) else "sdpa")


def observed(model) -> bool:
    """Whether any module of ``model`` has an attention observer, or the model a KV cache method
    (``vlsparse.kernels.kv_runtime``): both need the ``"vlsparse"`` attention function."""
    if getattr(model, KV_ATTR, None) is not None:
        return True
    return any(getattr(module, OBSERVER_ATTR, None) is not None for module in model.modules())


def set_observer(module, observer) -> None:
    """Give an attention module an observer (None removes it); see ``OBSERVER_ATTR``."""
    if observer is None:
        if hasattr(module, OBSERVER_ATTR):
            delattr(module, OBSERVER_ATTR)
    else:
        setattr(module, OBSERVER_ATTR, observer)


def detach(loaded, runtime: SparseRuntime) -> None:
    """Back to dense attention for this model: the runtime is switched off and its hook and
    per-layer references removed, so attaching again starts clean."""
    set_enabled(loaded, runtime, False)
    for handle in runtime.handles:
        handle.remove()
    runtime.handles.clear()
    for layer in loaded.adapter.lm_layers():
        module = loaded.adapter.self_attention(layer)
        if module is not None and getattr(module, RUNTIME_ATTR, None) is runtime:
            delattr(module, RUNTIME_ATTR)


__all__: list[Any] = ["ATTENTION_NAME", "KV_ATTR", "OBSERVER_ATTR", "SparseRuntime", "attach", "detach", "observed",
                      "off_causal_rows", "register_attention", "set_enabled", "set_observer", "vlsparse_attention"]
