"""``block_sparse`` (FlexPrefill / XAttention style): mean-pool q and k per 64-token block, block
scores ``scale * q_bar . k_bar`` (causal). ``blocks``: the top ``ceil(blocks * (qb + 1))`` key tiles
of query block ``qb``; ``mass`` (gamma): the fewest tiles whose softmax over block scores reaches
``mass``. The diagonal tile is always kept. Online estimate cost: ``2 * (N / 64)^2 * d``.
"""

from __future__ import annotations

import time

import torch

from vlsparse.kernels import estimate
from vlsparse.kernels.indices import block_mask_index, num_blocks
from vlsparse.patterns.common import block_mass_tiles, block_topk_tiles, candidate
from vlsparse.patterns.layout import Layout

NAME = "block_sparse"
BUDGETS, PARAMS, REQUIRED_PARAMS = ("blocks", "mass"), (), ()  # HeadProfile fields
USES_MASK, OFFLINE, COLOR = False, False, "#2ca02c"
BUDGET_MINIMUMS, TILE_BUDGETS = {}, ("blocks",)  # token / tile budgets


def candidates(n0, images, strides, space):
    return ([candidate(NAME, {"blocks": b}) for b in space.blocks]
            + [candidate(NAME, {"mass": m}) for m in space.mass])


def layout(cand, est, head, mask=None) -> Layout:
    b, scores = cand.budgets, est.blocks[head]
    return Layout(tiles=block_topk_tiles(scores, b["blocks"]) if "blocks" in b else block_mass_tiles(scores, b["mass"]))


def needed_columns(cand, est) -> dict[str, int]:
    return {}


def runtime_index(profiles, ids, inputs):
    """Heads with ``mass`` use it (gamma) and ignore ``blocks``; the others keep a top-k share."""
    parts = []
    with_mass = [(i, p) for i, p in zip(ids, profiles) if "mass" in p.budget]
    with_topk = [(i, p) for i, p in zip(ids, profiles) if "mass" not in p.budget]
    for sub, by_mass in ((with_mass, True), (with_topk, False)):
        if not sub:
            continue
        heads, sp = [i for i, _ in sub], [p for _, p in sub]
        mask = estimate.estimate_block_sparse(
            inputs.q, inputs.k, heads=heads, scale=inputs.scale, block_size=inputs.block_size,
            mass=[p.budget["mass"] for p in sp] if by_mass else None,
            blocks=None if by_mass else [p.budget.get("blocks", 0.0) for p in sp])
        parts.append((heads, block_mask_index(mask, inputs.n, inputs.block_size)))
    return parts


def estimate_flops(n: int, d: int, last_q: int, block: int) -> float:
    return 2.0 * num_blocks(n, block) ** 2 * d


def synthetic_index(n: int, heads: int, budget: float, generator: torch.Generator, block_size: int = 64):
    """Top ``budget`` share of random causal block scores; (index, seconds building the lists)."""
    nqb = num_blocks(n, block_size)
    scores = torch.rand(1, heads, nqb, nqb, generator=generator)
    qb = torch.arange(nqb)
    scores = scores.masked_fill(qb[None, :] > qb[:, None], -1.0)
    k_row = torch.ceil(budget * (qb + 1).float()).clamp(min=1)
    rank = scores.argsort(-1, descending=True).argsort(-1)
    start = time.perf_counter()
    index = block_mask_index(rank < k_row[:, None], n, block_size)
    return index, time.perf_counter() - start


def synthetic_bytes(n: int, heads: int, block_size: int = 64) -> int:
    """Working memory of ``synthetic_index`` beyond the lists: the random block scores and their two
    argsorts, 25 bytes per block pair."""
    nqb = -(-n // block_size)
    return 25 * heads * nqb * nqb


def density_guess(density: float) -> float:
    return density
