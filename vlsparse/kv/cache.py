"""vlsparse's KV cache layers, in transformers' ``Cache`` (one per full-attention layer).

- ``InPlaceLayer``: full precision in a ``GrowingBuffer``; ``update`` returns views of the held
  tokens, so any attention function (SDPA included) reads it.
- ``CompressedLayer``: a KV method's store (``vlsparse.kv.store.CompressedStore``). ``update``
  returns a ``KVHandle`` instead of tensors, so only the ``"vlsparse"`` attention function can
  read it (any other fails loudly, instead of attending to a wrong cache):

  - at prefill the handle carries the prompt's keys and values; the attention function runs the
    prefill on them, then calls ``finish_prefill`` with the queries, which plans and builds the store;
  - at decode the handle says how many tokens were appended; ``attend`` reads the store.

  ``get_seq_length`` counts every token seen (positions count from it), ``get_mask_sizes`` the
  tokens held (what the attention reads), so eviction keeps positions right. Only one sequence
  (batch 1) is compressed; a batch falls back to the in-place layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from vlsparse.compat import attention_scale, cache_layer_base
from vlsparse.kv.plan import KVContext, build_store, window_attention
from vlsparse.kv.quant import held_bytes
from vlsparse.kv.store import CompressedStore, GrowingBuffer

_Base = cache_layer_base()


class InPlaceLayer(_Base):
    """Full-precision keys and values written in place (see the module docstring)."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, chunk: int = 128) -> None:
        super().__init__()
        self.key_buffer, self.value_buffer = GrowingBuffer(chunk), GrowingBuffer(chunk)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = self.key_buffer.append(key_states)
        self.values = self.value_buffer.append(value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.key_buffer.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.key_buffer.length + query_length, 0

    def reset(self) -> None:
        self.key_buffer, self.value_buffer = GrowingBuffer(self.key_buffer.chunk), GrowingBuffer(self.value_buffer.chunk)
        self.keys = self.values = None
        self.is_initialized = False

    def held_nbytes(self) -> int:
        return held_bytes(self.key_buffer.tensors() + self.value_buffer.tensors())

    def _rewrite(self, keys: Tensor, values: Tensor) -> None:
        """Hold ``keys``/``values`` [B, H, n, D] instead (beam search and batch edits: rare, so copied)."""
        chunk = self.key_buffer.chunk
        self.key_buffer, self.value_buffer = GrowingBuffer(chunk), GrowingBuffer(chunk)
        self.keys, self.values = self.key_buffer.append(keys), self.value_buffer.append(values)

    def reorder_cache(self, beam_idx) -> None:
        if self.key_buffer.length:
            index = beam_idx.to(self.keys.device)
            self._rewrite(self.keys.index_select(0, index), self.values.index_select(0, index))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.key_buffer.length:
            self._rewrite(self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        if self.key_buffer.length:
            self._rewrite(self.keys[indices], self.values[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, not {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.key_buffer.length:
            return
        for buffer in (self.key_buffer, self.value_buffer):
            buffer.length = max(buffer.length + tokens_to_remove, 0)
        self.keys, self.values = self.key_buffer.view(), self.value_buffer.view()


@dataclass
class KVHandle:
    """What a ``CompressedLayer`` hands the attention function: the prompt's keys/values [1, heads_kv, n, dim]
    at prefill (``prefill=True``), or nothing at decode (the layer holds them)."""

    layer: "CompressedLayer"
    prefill: bool
    keys: Tensor | None = None
    values: Tensor | None = None


class CompressedLayer(_Base):
    """A KV method's compressed store of one layer (see the module docstring).

    ``method``: a ``vlsparse.kv`` method module; ``params``: its parameters (defaults filled in);
    ``image_mask``: called at prefill with the prompt length, returns the prompt's image positions
    [n] bool or None.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, method, params: dict[str, Any], image_mask: Callable[[int], Tensor | None]) -> None:
        super().__init__()
        self.method, self.params, self.image_mask = method, params, image_mask
        # transformers reads ``keys`` of every layer in places (Mllama asks each layer whether it caches
        # cross-attention states): an empty placeholder; the store holds the tokens
        self.keys = self.values = torch.empty(0)
        self.store: CompressedStore | None = None
        self.plain: InPlaceLayer | None = None  # a batch of several sequences: kept in place, uncompressed
        self.seen = 0
        self.plan_summary: dict[str, Any] = {}

    @property
    def residual(self) -> int:
        return int(self.params.get("residual", self.params.get("window", 32)))

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            if key_states.shape[0] != 1:
                self.plain = InPlaceLayer()
        if self.plain is not None:
            return self.plain.update(key_states, value_states)
        self.seen += key_states.shape[2]
        if self.store is None:
            handle = KVHandle(self, True, key_states, value_states)
        else:
            self.store.append(key_states[0], value_states[0])
            handle = KVHandle(self, False)
        return handle, handle

    def finish_prefill(self, query: Tensor, keys: Tensor, values: Tensor, scale: float) -> None:
        """Plan with the prompt's queries [1, heads_q, n, dim] and build the store of ``keys``/``values``."""
        n, heads = keys.shape[2], keys.shape[1]
        residual = self.residual
        ctx = KVContext(length=n, heads=heads, residual=residual, image_mask=self.image_mask(n))
        if self.method.OBSERVES and ctx.prefix:
            ctx.received, ctx.visible = window_attention(query[0], keys[0], int(self.params.get("window", 32)), scale)
        plan = self.method.plan(ctx, **self.params)
        self.store = build_store(keys[0], values[0], plan, residual)
        kept = plan.keep.shape[1] if plan.keep is not None else ctx.prefix
        high = int(plan.high[0].sum()) if plan.high is not None else 0
        self.plan_summary = {"prompt": n, "kept": kept + n - ctx.prefix, "high": high}

    def attend(self, query: Tensor, scale: float, softcap: float | None = None) -> Tensor:
        """Decode attention of ``query`` [1, heads_q, m, dim] over the store: [1, m, heads_q, dim] in its dtype."""
        out = self.store.attend(query[0], scale, softcap)
        return out.to(query.dtype).transpose(0, 1).unsqueeze(0)

    def get_seq_length(self) -> int:
        return self.plain.get_seq_length() if self.plain is not None else self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.plain is not None:
            return self.plain.get_mask_sizes(query_length)
        return (self.store.length if self.store is not None else 0) + query_length, 0

    def reset(self) -> None:
        self.store, self.plain, self.seen, self.is_initialized = None, None, 0, False

    def _batch_edit(self, name: str, *args) -> None:
        """Beam search and batch edits: a batch is held in place (``plain``); a compressed store holds one
        sequence, which a batch-1 edit leaves as it is."""
        if self.plain is not None:
            getattr(self.plain, name)(*args)
        elif self.store is not None and name != "reorder_cache":
            from vlsparse.errors import InputError, param

            raise InputError(f"a compressed KV cache holds one sequence and cannot {name.replace('_', ' ')}",
                             f"decode with {param('kv', 'fp')}, or generate without beams or assistants")

    def reorder_cache(self, beam_idx) -> None:
        self._batch_edit("reorder_cache", beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_edit("batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices) -> None:
        self._batch_edit("batch_select_indices", indices)

    def crop(self, tokens_to_remove: int) -> None:
        self._batch_edit("crop", tokens_to_remove)

    def held_nbytes(self) -> int:
        if self.plain is not None:
            return self.plain.held_nbytes()
        return self.store.nbytes() if self.store is not None else 0


def attend_handle(module, query: Tensor, handle: KVHandle, value, attention_mask, attention: Callable,
                  **kwargs) -> tuple[Tensor, None]:
    """The attention of a layer whose cache is a ``CompressedLayer``, given the ``KVHandle`` its ``update`` returned.

    Prefill: ``attention(module, query, keys, values, attention_mask, **kwargs)`` runs on the prompt's own
    keys and values, then the layer plans and compresses with the queries. Decode: the layer's store
    answers; a mask hiding some held token (padding, a window) is refused, since the store's tokens are
    not in sequence order.
    """
    scale = attention_scale(module, query, kwargs)
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise RuntimeError("this model's attention has learnt sinks, which a compressed KV cache does not read; "
                           "decode with the fp cache")
    if handle.prefill:
        out = attention(module, query, handle.keys, handle.values, attention_mask, **kwargs)
        handle.layer.finish_prefill(query, handle.keys, handle.values, scale)
        return out
    if attention_mask is not None and not _all_visible(attention_mask):
        raise RuntimeError("a compressed KV cache reads every held token; this decode step masks some "
                           "(padding or a window), which only a full-precision cache supports")
    return handle.layer.attend(query, scale, kwargs.get("softcap")), None


def _all_visible(mask: Tensor) -> bool:
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


__all__ = ["CompressedLayer", "InPlaceLayer", "KVHandle", "attend_handle"]
