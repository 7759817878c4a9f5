"""The integer arithmetic every allocation policy shares (not a policy itself).

Policies return integer keep counts per group (block) that sum to
``floor(N * (1 - ratio))`` exactly, ``N`` being the number of prunable weights in
all groups together, so the global ratio is met to within one weight; every
group's sparsity stays within ``ratio +- max_deviation`` up to one weight.
``fill_to_total`` is the water-filling that rounds a real-valued allocation to
such counts; ``split_count`` splits one group's count over its matrices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def keep_total(sizes: Sequence[int], ratio: float) -> int:
    """``floor(N * (1 - ratio))`` computed without float drift for exact ratios."""
    n = sum(int(s) for s in sizes)
    return int(math.floor(n * (1.0 - ratio) + 1e-9))


def deviation_bounds(sizes: Sequence[int], ratio: float, max_deviation: float) -> tuple[list[int], list[int]]:
    """Per-group (lowest, highest) keep counts allowed by ``ratio +- max_deviation``.

    ``lo = ceil(N_g (1 - ratio - d))`` and ``hi = floor(N_g (1 - ratio + d))``,
    clipped to ``[0, N_g]``; where rounding makes that empty or infeasible for
    the total (tiny ``d``), each bound widens by the rounding (one weight).
    """
    total = keep_total(sizes, ratio)
    lo = [min(s, max(0, math.ceil(s * (1 - ratio - max_deviation) - 1e-9))) for s in sizes]
    hi = [min(s, max(0, math.floor(s * (1 - ratio + max_deviation) + 1e-9))) for s in sizes]
    if any(a > b for a, b in zip(lo, hi)) or sum(lo) > total or sum(hi) < total:
        lo = [min(s, max(0, math.floor(s * (1 - ratio - max_deviation)))) for s in sizes]
        hi = [min(s, max(0, math.ceil(s * (1 - ratio + max_deviation)))) for s in sizes]
    return lo, hi


def fill_to_total(base: Sequence[float], slope: Sequence[float], lo: Sequence[int], hi: Sequence[int],
                  total: int) -> list[int]:
    """Integers ``x_g`` in ``[lo_g, hi_g]`` with ``sum(x) == total``, each within one of
    ``clamp(base_g + t * slope_g, lo_g, hi_g)`` for the level ``t`` that makes the
    clamped sum equal ``total`` (water-filling; ``slope_g >= 0``).

    The level is found by bisection (the clamped sum is monotone in ``t``);
    rounding then hands the leftover units to the largest fractional parts.
    """
    g = len(base)
    if sum(lo) > total or sum(hi) < total:
        raise ValueError(f"total {total} is outside [{sum(lo)}, {sum(hi)}]")
    if any(s < 0 for s in slope):
        raise ValueError("slopes must be >= 0")

    def level(t: float) -> list[float]:
        return [min(hi[i], max(lo[i], base[i] + t * slope[i])) for i in range(g)]

    moving = [i for i in range(g) if slope[i] > 0]
    if moving:
        t_lo = min((lo[i] - base[i]) / slope[i] for i in moving)
        t_hi = max((hi[i] - base[i]) / slope[i] for i in moving)
        for _ in range(200):
            mid = 0.5 * (t_lo + t_hi)
            if sum(level(mid)) < total:
                t_lo = mid
            else:
                t_hi = mid
        real = level(t_hi)
    else:
        real = level(0.0)
    out = [min(hi[i], max(lo[i], math.floor(real[i]))) for i in range(g)]
    frac = [real[i] - out[i] for i in range(g)]
    missing = total - sum(out)
    # hand out (or take back) single units, largest fractional part first
    while missing > 0:
        i = max((i for i in range(g) if out[i] < hi[i]), key=lambda i: (frac[i], slope[i]))
        out[i] += 1
        frac[i] -= 1.0
        missing -= 1
    while missing < 0:
        i = min((i for i in range(g) if out[i] > lo[i]), key=lambda i: (frac[i], -slope[i]))
        out[i] -= 1
        frac[i] += 1.0
        missing += 1
    return out


def split_count(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` over parts of ``sizes`` in proportion to size (largest remainder), each <= its size."""
    return fill_to_total([0.0] * len(sizes), [float(s) for s in sizes], [0] * len(sizes), list(sizes), total)
