"""Online index estimators (docs/methods.md, section 1): cheap per-input guesses of where attention goes.

Both are batched over heads and GQA-aware: query head ``h`` reads KV head ``h // group``;
K and V are never repeated, query heads sharing a KV head are folded into one matmul.

- :func:`estimate_vertical_slash` (MInference): the last ``last_q`` = 64 queries attend to
  all keys (softmax, causal); column sums rank the vertical key columns, sums along each
  diagonal rank the slash offsets. The first ``sink`` columns and the ``near`` nearest
  diagonals are always kept (30 and 100 at >= 8k tokens, scaled down linearly below).
- :func:`estimate_block_sparse` (FlexPrefill / XAttention-style pooling): mean-pool q and k
  per 64-token block, softmax of the causal block scores ``q_bar k_bar^T * scale`` per query
  block, keep the top-k blocks (``k = ceil(blocks * causal blocks of that row)``) or the
  smallest set whose mass reaches ``mass`` (gamma). The diagonal block is always kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

REFERENCE_LENGTH = 8192
"""Length at which the forced minimums below apply in full; they shrink linearly under it."""
SINK_COLUMNS = 30
"""Vertical-slash: first key columns always kept (MInference's sink columns)."""
NEAR_SLASHES = 100
"""Vertical-slash: nearest diagonals always kept."""


def scaled_minimum(base: int, n: int, reference: int = REFERENCE_LENGTH) -> int:
    """``base`` at ``n >= reference`` tokens, scaled down linearly below (at least 1)."""
    return max(1, min(base, math.ceil(base * n / reference)))


def _head_ids(heads: Sequence[int] | None, h: int) -> list[int]:
    return list(range(h)) if heads is None else [int(i) for i in heads]


def _per_head(value: float | int | Sequence | Tensor, count: int, dtype: torch.dtype) -> Tensor:
    t = torch.as_tensor(value, dtype=dtype)
    return t.expand(count).clone() if t.dim() == 0 else t


def grouped_scores(q: Tensor, k: Tensor, heads: Sequence[int], scale: float) -> Tensor:
    """``q[:, heads] @ k[:, heads // group]^T * scale`` in fp32 without repeating k.

    q: [B, H, L, D], k: [B, Hkv, M, D] -> [B, len(heads), L, M]. One matmul per KV head
    present, with that KV head's query heads stacked along the rows.
    """
    b, h, L, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    group = h // hkv
    out = torch.empty(b, len(heads), L, m, dtype=torch.float32, device=q.device)
    kv_of = torch.tensor(heads) // group
    for kv in kv_of.unique().tolist():
        pos = torch.nonzero(kv_of == kv).flatten()
        qs = q[:, [heads[i] for i in pos.tolist()]].float().reshape(b, len(pos) * L, d)
        scores = torch.matmul(qs, k[:, kv].float().transpose(-1, -2)).mul_(scale)
        out[:, pos] = scores.view(b, len(pos), L, m)
    return out


def _top_sorted(score: Tensor, counts: Tensor, n: int) -> Tensor:
    """Per row the ``counts[h]`` best indices of ``score`` [B, H, N], ascending, padded with n."""
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    top = score.topk(min(width, score.shape[-1]), dim=-1).indices
    keep = torch.arange(top.shape[-1], device=top.device) < counts.to(top.device)[:, None]
    return torch.where(keep, top, torch.full_like(top, n)).sort(-1).values


def estimate_vertical_slash(q: Tensor, k: Tensor, n_vertical: int | Sequence[int] | Tensor,
                            n_slash: int | Sequence[int] | Tensor, *, heads: Sequence[int] | None = None,
                            scale: float | None = None, rows: Tensor | None = None, last_q: int = 64,
                            sink: int = SINK_COLUMNS, near: int = NEAR_SLASHES) -> tuple[Tensor, Tensor]:
    """MInference's vertical-slash estimate from the last queries.

    q: [B, H, N, D] post-RoPE; k: [B, Hkv, N, D]; ``heads``: the query heads to estimate
    (default all); ``n_vertical``/``n_slash``: int or one per estimated head; ``rows``: query
    positions to use (default the last ``last_q``). With A = softmax(q_rows k^T * scale)
    (causal), vertical score(c) = sum_i A[i, c], slash score(s) = sum_i A[i, pos_i - s].
    Returns (vertical [B, h, NV], slash [B, h, NS]), ascending, padded with N.
    """
    b, h, n, d = q.shape
    ids = _head_ids(heads, h)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = torch.arange(max(n - last_q, 0), n) if rows is None else rows.long().cpu()
    nv = _per_head(n_vertical, len(ids), torch.long).clamp(0, n)
    ns = _per_head(n_slash, len(ids), torch.long).clamp(1, n)
    scores = grouped_scores(q[:, :, rows.to(q.device)], k, ids, scale)  # [B, h, L, N]
    keys = torch.arange(n, device=q.device)
    scores.masked_fill_(keys > rows.to(q.device)[:, None], float("-inf"))
    probs = scores.softmax(-1)
    vertical_score = probs.sum(-2)
    # skew: row i moved right by (pmax - pos_i) puts offset s = pos_i - key at column pmax - s
    pmax, pmin = int(rows.max()), int(rows.min())
    skew = torch.zeros(b, len(ids), n + pmax - pmin, dtype=probs.dtype, device=probs.device)
    for i, pos in enumerate(rows.tolist()):
        skew[..., pmax - pos: pmax - pos + n] += probs[:, :, i]
    slash_score = torch.zeros(b, len(ids), n, dtype=probs.dtype, device=probs.device)
    slash_score[..., : pmax + 1] = skew[..., : pmax + 1].flip(-1)
    cols = torch.arange(n, device=q.device)
    n_sink = torch.minimum(nv, torch.tensor(scaled_minimum(sink, n))).to(q.device)
    n_near = torch.minimum(ns, torch.tensor(scaled_minimum(near, n))).to(q.device)
    vertical_score.masked_fill_(cols < n_sink[:, None], float("inf"))
    slash_score.masked_fill_(cols < n_near[:, None], float("inf"))
    return _top_sorted(vertical_score, nv, n), _top_sorted(slash_score, ns, n)


def pool_blocks(x: Tensor, block_size: int) -> Tensor:
    """Mean over each block of ``block_size`` rows (the last block may be short): [..., N, D] -> [..., NB, D]."""
    n = x.shape[-2]
    nb = (n + block_size - 1) // block_size
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block_size - n))
    sums = padded.unflatten(-2, (nb, block_size)).sum(-2)
    counts = torch.full((nb,), float(block_size), device=x.device)
    counts[-1] = n - (nb - 1) * block_size
    return sums / counts[:, None]


def pooled_block_scores(q: Tensor, k: Tensor, *, heads: Sequence[int] | None = None, scale: float | None = None,
                        block_size: int = 64) -> Tensor:
    """``scale * mean_pool(q) . mean_pool(k)`` per (query block, key block), ``-inf`` above the diagonal.

    q: [B, H, N, D], k: [B, Hkv, N, D] -> [B, h, NQB, NKB] float32 (FlexPrefill / XAttention pooling;
    ``scale`` defaults to ``1 / sqrt(D)``). The search scores the same numbers offline.
    """
    ids = _head_ids(heads, q.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = grouped_scores(pool_blocks(q, block_size), pool_blocks(k, block_size), ids, scale)
    qb = torch.arange(scores.shape[-1], device=q.device)
    return scores.masked_fill(qb[None, :] > qb[:, None], float("-inf"))


def estimate_block_sparse(q: Tensor, k: Tensor, *, blocks: float | Sequence[float] | Tensor | None = None,
                          mass: float | Sequence[float] | Tensor | None = None, heads: Sequence[int] | None = None,
                          scale: float | None = None, block_size: int = 64) -> Tensor:
    """Block mask from mean-pooled block scores.

    q: [B, H, N, D], k: [B, Hkv, N, D]. Per estimated head either ``blocks`` (share of the
    causal key blocks kept per query block: top ``ceil(blocks * (i + 1))``, at least 1) or
    ``mass`` (gamma: keep blocks in descending score until their softmax mass reaches gamma).
    Returns bool [B, h, NQB, NKB], causal, diagonal set.
    """
    if (blocks is None) == (mass is None):
        raise ValueError("give exactly one of blocks= and mass=")
    ids = _head_ids(heads, q.shape[1])
    scores = pooled_block_scores(q, k, heads=ids, scale=scale, block_size=block_size)  # [B, h, NQB, NKB]
    nqb = scores.shape[-1]
    qb = torch.arange(nqb, device=q.device)
    causal = qb[None, :] <= qb[:, None]
    probs = scores.softmax(-1)
    order = probs.sort(-1, descending=True)
    if mass is not None:
        gamma = _per_head(mass, len(ids), torch.float32).to(q.device)
        before = order.values.cumsum(-1) - order.values
        keep_sorted = (before < gamma[:, None, None]) | (gamma[:, None, None] >= 1.0)  # 1.0: all, despite rounding
    else:
        share = _per_head(blocks, len(ids), torch.float32).to(q.device)
        k_row = torch.ceil(share[:, None] * (qb + 1).float() - 1e-6).clamp(min=1)  # [h, NQB]
        keep_sorted = (torch.arange(nqb, device=q.device) < k_row[..., None]).expand_as(order.values)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order.indices, keep_sorted)
    return (keep & causal) | torch.eye(nqb, dtype=torch.bool, device=q.device)


__all__ = ["estimate_block_sparse", "estimate_vertical_slash", "grouped_scores", "pool_blocks", "pooled_block_scores",
           "scaled_minimum"]
