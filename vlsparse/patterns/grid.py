"""``grid`` (MMInference): diagonals ``phase + m * stride`` (``stride`` = the image's row or frame
stride in tokens, from the processor's grid; ``phase`` in {0, 1, -1}, taken modulo the stride)
plus the ``local`` (minimum 1) nearest diagonals.

Search space: every stride of the input's images below the calibration length x
``grid_local_tokens`` x ``GRID_PHASES``.
"""

from __future__ import annotations

from vlsparse.kernels.indices import budget_count, grid_index, grid_slashes, slash_windows
from vlsparse.patterns.common import cached, candidate, fraction_of, head_counts
from vlsparse.patterns.layout import Layout

NAME = "grid"
BUDGETS, PARAMS, REQUIRED_PARAMS = ("local",), ("stride", "phase"), ("stride",)  # HeadProfile fields
USES_MASK, OFFLINE, COLOR = False, False, "#9467bd"
BUDGET_MINIMUMS, TILE_BUDGETS = {"local": 1}, ()  # token / tile budgets
GRID_PHASES = (0, 1, -1)
"""Grid phases searched (MMInference: 0, 1 and stride - 1)."""


def candidates(n0, images, strides, space):
    frac = fraction_of(n0)
    return [candidate(NAME, {"local": frac(t)}, {"stride": stride, "phase": p})
            for stride in strides if 0 < stride < n0 for t in space.grid_local_tokens if t < n0
            for p in GRID_PHASES]


def layout(cand, est, head, mask=None) -> Layout:
    p, n = cand.parameters, est.n
    slashes = grid_slashes(n, p["stride"], p["phase"], budget_count(cand.budgets["local"], n, 1))
    starts = cached(est, ("grid", p["stride"], p["phase"], slashes.numel()),
                    lambda: slash_windows(slashes, n, est.block))
    return Layout(starts=starts[None])


def needed_columns(cand, est) -> dict[str, int]:
    return {}


def runtime_index(profiles, ids, inputs):
    n = inputs.n
    return [(ids, grid_index(n, [int(p.params["stride"]) for p in profiles],
                             [int(p.params.get("phase", 0)) for p in profiles],
                             head_counts(profiles, "local", n, 1), len(ids), inputs.block_size))]


def estimate_flops(n: int, d: int, last_q: int, block: int) -> float:
    return 0.0


synthetic_index = None
synthetic_bytes = None
density_guess = None
