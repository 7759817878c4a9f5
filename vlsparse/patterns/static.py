"""``static`` (SparseD): a fixed tile mask chosen offline (per query block the top
``ceil(select * (qb + 1))`` key tiles by mean softmax mass over the calibration samples), stored
at the calibration length in the profile's sidecar and resized to other lengths by nearest tile
centre; causal, diagonal kept. Scored after all samples (``OFFLINE``), not per input.
"""

from __future__ import annotations

import torch

from vlsparse.kernels.indices import num_blocks, resize_block_mask, static_index
from vlsparse.patterns.common import candidate, resize_tile_mask
from vlsparse.patterns.layout import Layout

NAME = "static"
BUDGETS, PARAMS, REQUIRED_PARAMS = ("select",), (), ()  # HeadProfile fields
USES_MASK, OFFLINE, COLOR = True, True, "#8c564b"
BUDGET_MINIMUMS, TILE_BUDGETS = {}, ("select",)  # token / tile budgets


def candidates(n0, images, strides, space):
    return [candidate(NAME, {"select": s}) for s in space.select]


def layout(cand, est, head, mask=None) -> Layout:
    """The stored ``mask`` on this input's tile grid (there is no online layout without one)."""
    if mask is None:
        raise ValueError(f"no online layout for pattern {cand.pattern!r}")
    return Layout(tiles=resize_tile_mask(mask, num_blocks(est.n, est.block)))


def needed_columns(cand, est) -> dict[str, int]:
    return {}


def runtime_index(profiles, ids, inputs):
    masks = inputs.masks
    if masks is None or any(p.mask not in masks for p in profiles):
        raise ValueError("static heads need their block masks (the profile's sidecar tensors)")
    nqb = num_blocks(inputs.n, inputs.block_size)
    stacked = torch.stack([resize_block_mask(torch.as_tensor(masks[p.mask]).bool(), nqb) for p in profiles])
    return [(ids, static_index(stacked, inputs.n, inputs.block_size))]


def estimate_flops(n: int, d: int, last_q: int, block: int) -> float:
    return 0.0


synthetic_index = None
synthetic_bytes = None
density_guess = None
