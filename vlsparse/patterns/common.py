"""Machinery several patterns share: candidates, the search's online estimates, layout helpers.

The search side (``Estimates``, layouts) works on one input without a batch axis
(``q``: ``[H, N, d]``, ``k``: ``[H_kv, N, d]``); the index plumbing it shares with the
runtime (``slash_windows``, ``resize_block_mask``, ``modality_rows``,
``modality_block_groups``, ``pooled_block_scores``) lives once in ``vlsparse.kernels``.
Budgets are fractions of N turned into counts by
``budget_count(fraction, n, minimum) = clamp(round(fraction * n), minimum, n)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vlsparse.kernels.estimate import NEAR_SLASHES, SINK_COLUMNS, pooled_block_scores, scaled_minimum
from vlsparse.kernels.indices import (budget_count, modality_block_groups, modality_rows, resize_block_mask,
                                      slash_windows)
from vlsparse.kernels.indices import BLOCK_SIZE as BLOCK
from vlsparse.patterns.layout import causal_tiles

LAST_Q = 64
"""Query rows the online estimate looks at."""


@dataclass(frozen=True)
class Candidate:
    """One point of the search space: a pattern with named budgets (fractions of N) and integer params."""

    pattern: str
    budget: tuple[tuple[str, float], ...] = ()
    params: tuple[tuple[str, int], ...] = ()

    @property
    def budgets(self) -> dict[str, float]:
        return dict(self.budget)

    @property
    def parameters(self) -> dict[str, int]:
        return dict(self.params)

    @property
    def key(self) -> str:
        parts = [f"{k}={v:.4g}" for k, v in self.budget] + [f"{k}={v}" for k, v in self.params]
        return f"{self.pattern}({', '.join(parts)})"


def candidate(pattern: str, budget: dict[str, float] | None = None, params: dict[str, int] | None = None) -> Candidate:
    return Candidate(pattern, tuple((k, float(v)) for k, v in (budget or {}).items()),
                     tuple((k, int(v)) for k, v in (params or {}).items()))


def fraction_of(n0: int):
    """``tokens -> min(1, tokens / n0)``: a token count at the calibration length as a budget fraction."""
    return lambda tokens: min(1.0, tokens / n0)


def vertical_slash_pairs(n0: int, verticals: Sequence[float], slashes: Sequence[float]) -> list[tuple[float, float]]:
    """Distinct (vertical, slash) budget pairs; 0.0 means the forced minimum (30 columns / 100 diagonals)."""
    frac = fraction_of(n0)
    return list(dict.fromkeys((max(v, frac(SINK_COLUMNS)), max(s, frac(NEAR_SLASHES)))
                              for v in verticals for s in slashes))


def head_counts(profiles, key: str, n: int, minimum: int = 0) -> list[int]:
    """Budget ``key`` of each ``HeadProfile`` in tokens at length ``n`` (missing budgets count as 0.0)."""
    return [budget_count(p.budget.get(key, 0.0), n, minimum) for p in profiles]


# ----------------------------------------------------------------------------- online estimates (search side)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, rows: torch.Tensor) -> torch.Tensor:
    """Causal softmax of ``rows``' queries over all keys: ``[H, R, N]``."""
    heads, n, dim = q.shape
    kv_heads = k.shape[0]
    qr = q[:, rows].float().reshape(kv_heads, (heads // kv_heads) * len(rows), dim)
    s = torch.bmm(qr, k.float().transpose(1, 2)).view(heads, len(rows), n) * scale
    s.masked_fill_(torch.arange(n)[None, :] > rows[:, None], float("-inf"))
    return torch.softmax(s, dim=-1)


def vertical_slash_scores(q: torch.Tensor, k: torch.Tensor, scale: float,
                          rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's estimate from query ``rows`` (the last 64): column sums and diagonal sums, ``[H, N]`` each.

    ``slash[h, o] = sum_r A[h, r, rows[r] - o]`` is the mass on the diagonal at offset ``o``.
    """
    heads, n, _ = q.shape
    a = _scores(q, k, scale, rows)
    vertical = a.sum(dim=1)
    offsets = (rows[:, None] - torch.arange(n)[None, :]).clamp(min=0).reshape(1, -1).expand(heads, -1)
    slash = torch.zeros(heads, n).scatter_add_(1, offsets, a.reshape(heads, -1))
    return vertical, slash


def priority_order(scores: torch.Tensor, forced: int) -> torch.Tensor:
    """Indices by priority: ``0 .. forced-1`` first, then the rest by descending score (ties by index).

    The first ``c`` of them are the runtime's top-``c`` with ``min(c, forced)`` forced.
    """
    key = scores.clone()
    key[:, :forced] = float("inf")
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def search_block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block: int = BLOCK) -> torch.Tensor:
    """The runtime's pooled block scores (``kernels.estimate.pooled_block_scores``) for one input: ``[H, nb, nb]``."""
    return pooled_block_scores(q[None], k[None], scale=scale, block_size=block)[0]


@dataclass
class Estimates:
    """What the online estimators see for one input and one layer (all heads).

    ``orders[kind]``: ``(vertical, slash)`` priority orders ``[H, N]`` for ``kind`` in
    ``all`` (last 64 rows), ``text`` and ``image`` (last 64 rows of that modality;
    ``None`` when the input has no rows of it); ``blocks``: pooled block scores
    ``[H, nb, nb]``; ``groups``: ``[nb]`` query-block groups (0 text-only, 1 image-only,
    2 mixed); ``images``: whether the input has image rows.
    """

    n: int
    block: int
    orders: dict[str, tuple[torch.Tensor, torch.Tensor] | None]
    blocks: torch.Tensor
    groups: torch.Tensor
    images: bool = False
    cache: dict = field(default_factory=dict, repr=False)


def image_row_mask(n: int, spans) -> torch.Tensor:
    """Bool ``[n]``: token positions inside an image span (the runtime's ``modality_rows``)."""
    return modality_rows(spans, n)


def block_groups(n: int, spans, block: int = BLOCK) -> torch.Tensor:
    """Group of each query block: 0 text rows only, 1 image rows only, 2 both (the runtime's)."""
    return modality_block_groups(spans, n, block)


def estimate(q: torch.Tensor, k: torch.Tensor, scale: float, spans=(), last_q: int = LAST_Q,
             block: int = BLOCK) -> Estimates:
    """Run every online estimator for one layer of one input (``q``: ``[H, N, d]``, ``k``: ``[H_kv, N, d]``)."""
    n = q.shape[1]
    sink, near = scaled_minimum(SINK_COLUMNS, n), scaled_minimum(NEAR_SLASHES, n)

    def orders(rows: torch.Tensor):
        if rows.numel() == 0:
            return None
        v, s = vertical_slash_scores(q, k, scale, rows)
        return priority_order(v, sink), priority_order(s, near)

    image = image_row_mask(n, spans)
    out = {"all": orders(torch.arange(max(0, n - last_q), n))}
    if image.any():
        out["text"] = orders((~image).nonzero().flatten()[-last_q:])
        out["image"] = orders(image.nonzero().flatten()[-last_q:])
    return Estimates(n=n, block=block, orders=out, blocks=search_block_scores(q, k, scale, block),
                     groups=block_groups(n, spans, block), images=bool(image.any()))


def cached(est: Estimates, key, build):
    """``est.cache[key]``, built once per input."""
    if key not in est.cache:
        est.cache[key] = build()
    return est.cache[key]


# ----------------------------------------------------------------------------- layouts


def vertical_slash_set(est: Estimates, kind: str, head: int, v: float, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted vertical columns, window starts) of one vertical-slash set from ``est.orders[kind]``."""
    n = est.n
    nv, ns = budget_count(v, n), budget_count(s, n, 1)
    orders = est.orders.get(kind)
    if orders is None:
        return torch.empty(0, dtype=torch.long), slash_windows([], n, est.block)
    cols = cached(est, ("v", kind, head, nv), lambda: torch.sort(orders[0][head, :nv]).values)
    starts = cached(est, ("s", kind, head, ns), lambda: slash_windows(orders[1][head, :ns], n, est.block))
    return cols, starts


def slash_offsets(est: Estimates, kind: str, head: int, slashes: int) -> torch.Tensor:
    """The ``slashes`` best diagonal offsets of ``kind`` (empty when the input has no such rows)."""
    orders = est.orders.get(kind)
    return torch.empty(0, dtype=torch.long) if orders is None else orders[1][head, :slashes]


def stack_starts(sets: list[torch.Tensor], pad: int) -> torch.Tensor:
    """Window-start sets of different lengths as rows ``[len(sets), W]``, padded with ``pad``."""
    width = max(s.numel() for s in sets)
    return torch.stack([torch.nn.functional.pad(s, (0, width - s.numel()), value=pad) for s in sets])


def block_topk_tiles(scores: torch.Tensor, share: float) -> torch.Tensor:
    """Top ``ceil(share * (qb + 1))`` (at least 1) key tiles per query block by score, plus the diagonal."""
    nb = scores.shape[0]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    keep_n = torch.ceil(share * torch.arange(1, nb + 1, dtype=torch.float64) - 1e-6).clamp(min=1)
    keep_sorted = torch.arange(nb)[None, :] < keep_n[:, None]
    keep = torch.zeros(nb, nb, dtype=torch.bool).scatter_(1, order, keep_sorted)
    return (keep & causal_tiles(nb)) | torch.eye(nb, dtype=torch.bool)


def block_mass_tiles(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Fewest key tiles per query block whose softmax over ``scores`` reaches ``mass``, plus the diagonal."""
    nb = scores.shape[0]
    probs = torch.softmax(scores, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p < mass) | (mass >= 1.0)
    keep = torch.zeros(nb, nb, dtype=torch.bool).scatter_(1, order, keep_sorted)
    return (keep & causal_tiles(nb)) | torch.eye(nb, dtype=torch.bool)


def static_tiles(mean_mass: torch.Tensor, select: float) -> torch.Tensor:
    """SparseD: per query block the top ``ceil(select * (qb + 1))`` tiles by mean mass, plus the diagonal."""
    nb = mean_mass.shape[0]
    return block_topk_tiles(mean_mass.masked_fill(~causal_tiles(nb), float("-inf")), select)


def resize_tile_mask(mask: torch.Tensor, nb: int) -> torch.Tensor:
    """A static tile mask at another length: the runtime's nearest-tile-centre ``resize_block_mask``,
    causal, diagonal kept."""
    return (resize_block_mask(mask.bool(), nb) & causal_tiles(nb)) | torch.eye(nb, dtype=torch.bool)
