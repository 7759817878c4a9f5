"""``dense``: every causal tile (exact causal attention); the fallback every head can choose."""

from __future__ import annotations

from vlsparse.kernels.indices import dense_index, num_blocks
from vlsparse.patterns.common import candidate
from vlsparse.patterns.layout import Layout, causal_tiles

NAME = "dense"
BUDGETS, PARAMS, REQUIRED_PARAMS = (), (), ()  # HeadProfile fields
USES_MASK, OFFLINE, COLOR = False, False, "#7f7f7f"
BUDGET_MINIMUMS, TILE_BUDGETS = {}, ()  # token / tile budgets


def candidates(n0, images, strides, space):
    """The one dense candidate."""
    return [candidate(NAME)]


def layout(cand, est, head, mask=None) -> Layout:
    return Layout(tiles=causal_tiles(num_blocks(est.n, est.block)))


def needed_columns(cand, est) -> dict[str, int]:
    return {}


def runtime_index(profiles, ids, inputs):
    return [(ids, dense_index(inputs.n, len(ids), 1, inputs.block_size))]


def estimate_flops(n: int, d: int, last_q: int, block: int) -> float:
    return 0.0


synthetic_index = None
synthetic_bytes = None
density_guess = None
