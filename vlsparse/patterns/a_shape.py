"""``a_shape`` (StreamingLLM / MInference "A-shape"): key columns ``0 .. sink-1`` (minimum 0)
plus the ``local`` (minimum 1) nearest diagonals, as MInference's 64-wide slash windows.

Search space: ``sink_tokens`` x ``local_tokens`` (tokens at the calibration length, below it).
"""

from __future__ import annotations

import time

import torch

from vlsparse.kernels.indices import a_shape_index, budget_count, slash_windows
from vlsparse.patterns.common import cached, candidate, fraction_of, head_counts
from vlsparse.patterns.layout import Layout

NAME = "a_shape"
BUDGETS, PARAMS, REQUIRED_PARAMS = ("sink", "local"), (), ()  # HeadProfile fields
USES_MASK, OFFLINE, COLOR = False, False, "#1f77b4"
BUDGET_MINIMUMS, TILE_BUDGETS = {"sink": 0, "local": 1}, ()  # token / tile budgets


def candidates(n0, images, strides, space):
    frac = fraction_of(n0)
    return [candidate(NAME, {"sink": frac(s), "local": frac(t)})
            for s in space.sink_tokens for t in space.local_tokens if t < n0]


def layout(cand, est, head, mask=None) -> Layout:
    b, n = cand.budgets, est.n
    local = budget_count(b["local"], n, 1)
    starts = cached(est, ("local", local), lambda: slash_windows(torch.arange(local), n, est.block))
    return Layout(starts=starts[None], columns=torch.arange(budget_count(b["sink"], n)))


def needed_columns(cand, est) -> dict[str, int]:
    return {"sink": budget_count(cand.budgets["sink"], est.n)}


def runtime_index(profiles, ids, inputs):
    n = inputs.n
    return [(ids, a_shape_index(n, head_counts(profiles, "sink", n), head_counts(profiles, "local", n, 1),
                                len(ids), inputs.block_size))]


def estimate_flops(n: int, d: int, last_q: int, block: int) -> float:
    return 0.0


def synthetic_index(n: int, heads: int, budget: float, generator: torch.Generator, block_size: int = 64):
    """64 sink keys + a local band of ``budget * n`` diagonals; (index, seconds building the lists)."""
    start = time.perf_counter()
    index = a_shape_index(n, min(64, n), max(1, round(budget * n)), heads, block_size)
    return index, time.perf_counter() - start


def synthetic_bytes(n: int, heads: int, block_size: int = 64) -> int:
    """Working memory of ``synthetic_index`` beyond the lists: none."""
    return 0


def density_guess(density: float) -> float:
    return density / 2
