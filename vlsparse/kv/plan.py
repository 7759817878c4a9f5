"""What a KV method decides at prefill (``KVPlan``), from what it sees (``KVContext``), and the store it yields."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vlsparse.kv.store import CompressedStore, make_tier


@dataclass
class KVContext:
    """One layer's prompt as a KV method sees it.

    ``length``: prompt tokens; ``heads``: KV heads; ``residual``: the prompt's last tokens that stay at
    full precision (the plan decides about the ``prefix = length - residual`` before them);
    ``image_mask`` [length] bool (None: unknown, e.g. a text model); ``received`` [heads, length]: the
    attention each key received from the observation window's queries (softmax over all visible
    keys, summed over the window's rows and the query heads sharing the KV head); ``visible``
    [length]: how many window rows can see each key. Both None unless the method ``OBSERVES``.
    """

    length: int
    heads: int
    residual: int
    image_mask: Tensor | None = None
    received: Tensor | None = None
    visible: Tensor | None = None

    @property
    def prefix(self) -> int:
        return max(self.length - self.residual, 0)


@dataclass
class KVPlan:
    """How a layer holds its prompt's prefix.

    ``keep`` [heads, n_keep]: sorted prefix indices kept per KV head (None: all); ``high`` [heads, n_keep]
    bool, the same count per head: held at ``high_bits`` (None: none); the rest at ``low_bits``
    (16 or more: full precision).
    """

    low_bits: int
    high_bits: int = 16
    keep: Tensor | None = None
    high: Tensor | None = None
    key_group: int = 32
    value_group: int = 32


def window_attention(query: Tensor, key: Tensor, window: int, scale: float) -> tuple[Tensor, Tensor]:
    """(received [heads_kv, n], visible [n]) for the last ``window`` queries of ``query`` [heads_q, n, dim]
    over ``key`` [heads_kv, n, dim], causal (see ``KVContext``), by ``vlsparse.tokens.attention``."""
    from vlsparse.tokens.attention import attention_received, visible_row_counts

    heads_q, n, _ = query.shape
    heads = key.shape[0]
    rows = torch.arange(max(n - window, 0), n)
    received = attention_received(query, key, scale, rows).view(heads, heads_q // heads, n).sum(1)
    return received, visible_row_counts(rows, n).float()


def build_store(keys: Tensor, values: Tensor, plan: KVPlan, residual: int) -> CompressedStore:
    """The store of ``keys``/``values`` [heads, n, dim] under ``plan``: the prefix's kept tokens in a high-bit
    and a low-bit tier, the last ``residual`` tokens at full precision."""
    heads, n, dim = keys.shape
    prefix = max(n - residual, 0)
    store = CompressedStore(low_bits=plan.low_bits, key_group=plan.key_group, value_group=plan.value_group,
                            residual=residual)
    k, v = keys[:, :prefix], values[:, :prefix]
    keep = plan.keep
    if keep is None:
        keep = torch.arange(prefix).expand(heads, prefix)
    if plan.high is not None and bool(plan.high.any()):
        count = int(plan.high[0].sum())
        parts = [(keep.masked_select(plan.high).view(heads, count), plan.high_bits),
                 (keep.masked_select(~plan.high).view(heads, keep.shape[1] - count), plan.low_bits)]
    else:
        parts = [(keep, plan.low_bits)]
    for index, bits in parts:
        if index.shape[1]:
            gather = index[..., None].expand(-1, -1, dim)
            store.tiers.append(make_tier(k.gather(1, gather), v.gather(1, gather), bits, plan.key_group,
                                         plan.value_group))
    store.recent_keys.append(keys[:, prefix:])
    store.recent_values.append(values[:, prefix:])
    return store


def top_per_head(scores: Tensor, count: int) -> Tensor:
    """Sorted indices [heads, count] of each row's ``count`` largest ``scores`` [heads, n]."""
    return scores.topk(count, dim=1).indices.sort(dim=1).values


__all__ = ["KVContext", "KVPlan", "build_store", "top_per_head", "window_attention"]
