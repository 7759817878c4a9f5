"""Uniform allocation: every block keeps ``N_g * (1 - ratio)`` weights (rounded so the total is exact).

The only allocation N:M structure allows, and the reference the others deviate from.
"""

from __future__ import annotations

from collections.abc import Sequence

from vlsparse.compress.allocations.fill import deviation_bounds, fill_to_total, keep_total


def uniform(sizes: Sequence[int], ratio: float) -> list[int]:
    """Keep counts giving every group the same sparsity ``ratio`` (to within one weight)."""
    lo, hi = deviation_bounds(sizes, ratio, 0.0)
    return fill_to_total([s * (1 - ratio) for s in sizes], list(sizes), lo, hi, keep_total(sizes, ratio))


def scores(streamed, batches: list[dict], config, progress) -> tuple[None, dict]:
    """No scores, nothing to record."""
    return None, {}


def keep_counts(sizes: Sequence[int], scores: Sequence[float] | None, config) -> list[int]:
    return uniform(sizes, config.ratio)
