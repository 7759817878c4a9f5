"""``vertical_slash`` (MInference): indices estimated from the last ``last_q`` = 64 query rows,
``A = softmax(q_last k^T)`` (causal); column sums rank key columns, sums along each diagonal
``i - j = o`` rank offsets. Keep ``vertical`` columns (the first ``scaled(30)`` always among them)
and ``slash`` (minimum 1) offsets (the ``scaled(100)`` nearest always among them);
``scaled(m) = clamp(ceil(m N / 8192), 1, m)``. Online estimate cost: ``2 * 64 * N * d``.
"""

from __future__ import annotations

import time

import torch

from vlsparse.kernels import estimate
from vlsparse.kernels.indices import budget_count, vertical_slash_index
from vlsparse.patterns.common import candidate, head_counts, vertical_slash_pairs, vertical_slash_set
from vlsparse.patterns.layout import Layout

NAME = "vertical_slash"
BUDGETS, PARAMS, REQUIRED_PARAMS = ("vertical", "slash"), (), ()  # HeadProfile fields
USES_MASK, OFFLINE, COLOR = False, False, "#d62728"
BUDGET_MINIMUMS, TILE_BUDGETS = {"vertical": 0, "slash": 1}, ()  # token / tile budgets


def candidates(n0, images, strides, space):
    return [candidate(NAME, {"vertical": v, "slash": s})
            for v, s in vertical_slash_pairs(n0, space.vertical, space.slash)]


def layout(cand, est, head, mask=None) -> Layout:
    b = cand.budgets
    cols, starts = vertical_slash_set(est, "all", head, b["vertical"], b["slash"])
    return Layout(starts=starts[None], columns=cols)


def needed_columns(cand, est) -> dict[str, int]:
    return {"all": budget_count(cand.budgets["vertical"], est.n)}


def runtime_index(profiles, ids, inputs):
    n = inputs.n
    vertical, slash = estimate.estimate_vertical_slash(
        inputs.q, inputs.k, head_counts(profiles, "vertical", n), head_counts(profiles, "slash", n, 1),
        heads=ids, scale=inputs.scale, last_q=inputs.last_q)
    return [(ids, vertical_slash_index(vertical, slash, n, inputs.block_size))]


def estimate_flops(n: int, d: int, last_q: int, block: int) -> float:
    return 2.0 * last_q * n * d


def synthetic_index(n: int, heads: int, budget: float, generator: torch.Generator, block_size: int = 64):
    """30 sink columns + random columns and 100 nearest diagonals + random slashes (``budget * n / 2``
    each); (index, seconds building the lists)."""
    count = max(1, round(budget * n / 2))
    sink, near = min(30, count), min(100, count)
    vertical = torch.cat([torch.arange(sink).expand(heads, sink),
                          torch.randint(0, n, (heads, count - sink), generator=generator)], 1)
    slash = torch.cat([torch.arange(near).expand(heads, near),
                       torch.randint(0, n, (heads, count - near), generator=generator)], 1)
    start = time.perf_counter()
    index = vertical_slash_index(vertical[None], slash[None], n, block_size)
    return index, time.perf_counter() - start


def synthetic_bytes(n: int, heads: int, block_size: int = 64) -> int:
    """Working memory of ``synthetic_index`` beyond the lists: none."""
    return 0


def density_guess(density: float) -> float:
    return density / 2
