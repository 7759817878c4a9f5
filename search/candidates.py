"""Candidate sparse patterns: the search space, the online index estimates, and their layouts.

Every candidate becomes, per head and per input, the ``Layout`` the runtime
(``vlsparse.kernels.indices.layer_index``) computes for the same ``HeadProfile``,
so the recall measured offline is the recall the kernels keep
(``tests/test_search_runtime_agreement.py`` and ``tests/test_patterns_registry.py`` check
the two against each other). Each pattern's candidates, layout and runtime index live in
one module of ``vlsparse.patterns`` (its docstring gives the pattern's formula); this
module runs them through the pattern table. Budgets are fractions of the length ``N``
(``vlsparse.profile``), turned into counts at each length by
``budget_count(fraction, n, minimum) = clamp(round(fraction * n), minimum, n)``.

Diagonals (slashes) run as MInference's 64-wide key windows, placed the same way in
every query block (greedy cover of the needed distances, starting at the diagonal);
single columns are the verticals outside every window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vlsparse.kernels.estimate import NEAR_SLASHES, SINK_COLUMNS, scaled_minimum
from vlsparse.kernels.indices import budget_count, grid_slashes, slash_windows
from vlsparse.patterns import PATTERNS, SEARCH_ORDER, lookup
from vlsparse.patterns.common import (LAST_Q, Candidate, Estimates, block_groups, block_mass_tiles,
                                      block_topk_tiles, candidate, estimate, image_row_mask, priority_order,
                                      resize_tile_mask, search_block_scores, static_tiles, vertical_slash_scores)
from vlsparse.patterns.grid import GRID_PHASES
from vlsparse.search.recall import BLOCK, Layout, num_blocks

PATTERN_ORDER = SEARCH_ORDER
"""Catalogue order: patterns needing no online estimate first (the tie-break prefers earlier ones)."""

pooled_block_scores = search_block_scores


@dataclass(frozen=True)
class SearchSpace:
    """Budget ladders of the search. Token counts are at the calibration length; fractions of N otherwise.

    Defaults: A-shape with 4 or 64 sink columns and local windows of 1-33 64-wide
    windows; vertical-slash with 30 / 1% / 2% / 5% / 10% columns and 100 / 5% / 10% /
    20% / 40% diagonals; top-k block shares 5-50%; cumulative block mass 0.5-0.99;
    static selections 5-50% (in 5-point steps up to 30%); grid local bands of 1-4 windows at three phases and two
    strides (image row, image); a coarser 3 x 3 ladder per modality.
    """

    sink_tokens: tuple[int, ...] = (4, 64)
    local_tokens: tuple[int, ...] = (1, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
    vertical: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1)
    slash: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.4)
    blocks: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
    mass: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
    select: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5)
    grid_local_tokens: tuple[int, ...] = (1, 64, 128, 192)
    modality_vertical: tuple[float, ...] = (0.0, 0.02, 0.1)
    modality_slash: tuple[float, ...] = (0.0, 0.1, 0.3)
    patterns: tuple[str, ...] = PATTERN_ORDER


def catalogue(n0: int, images: bool = False, strides: tuple[int, ...] = (), space: SearchSpace = SearchSpace(),
              registry: Mapping = PATTERNS) -> list[Candidate]:
    """The candidates, in catalogue order, for calibration length ``n0``.

    A ladder value of 0.0 for ``vertical`` / ``slash`` means the forced minimum
    (30 columns / 100 diagonals), recorded as that count over ``n0``. Modality-aware
    candidates need image spans (``images``); grid candidates need image ``strides``.
    Names in ``space.patterns`` that ``registry`` does not hold are skipped.
    """
    out: list[Candidate] = []
    for pattern in space.patterns:
        if pattern in registry:
            out += registry[pattern].candidates(n0, images, strides, space)
    return out


# ----------------------------------------------------------------------------- budget -> counts


BUDGET_MINIMUM = {key: minimum for module in PATTERNS.values() for key, minimum in module.BUDGET_MINIMUMS.items()}
"""Token budgets and their minimum counts (every pattern's ``BUDGET_MINIMUMS``)."""


def budget_counts(cand: Candidate, n: int, block: int = BLOCK, registry: Mapping = PATTERNS) -> dict[str, int]:
    """The budgets of ``cand`` at length ``n``: tokens, or tiles per query block row for ``blocks``
    and ``select`` (at the last row). ``mass`` has no fixed count and is left out."""
    module = lookup(cand.pattern, registry)
    nb = num_blocks(n, block)
    out: dict[str, int] = {}
    for key, value in cand.budget:
        if key in module.BUDGET_MINIMUMS:
            out[key] = budget_count(value, n, module.BUDGET_MINIMUMS[key])
        elif key in module.TILE_BUDGETS:
            out[key] = max(1, math.ceil(value * nb - 1e-6))
    return out


# ----------------------------------------------------------------------------- layouts


def build_layout(cand: Candidate, est: Estimates, head: int, registry: Mapping = PATTERNS) -> Layout:
    """The layout ``cand`` runs for ``head`` on the input ``est`` was estimated from (not ``static``)."""
    try:
        module = lookup(cand.pattern, registry)
    except ValueError:
        raise ValueError(f"no online layout for pattern {cand.pattern!r}") from None
    return module.layout(cand, est, head)


def needed_columns(est: Estimates, candidates: list[Candidate], registry: Mapping = PATTERNS) -> torch.Tensor:
    """Sorted key columns per head ``[H, U]`` (padded with ``N``) that any candidate may keep:
    the first ``sink`` columns and the best columns of each estimate (``all``, ``text``, ``image``)."""
    n = est.n
    heads = est.blocks.shape[0]
    most = {"sink": 0, "all": 0, "text": 0, "image": 0}
    for cand in candidates:
        for kind, width in lookup(cand.pattern, registry).needed_columns(cand, est).items():
            most[kind] = max(most[kind], width)
    per_head = []
    for h in range(heads):
        parts = [torch.arange(most["sink"])]
        for kind in ("all", "text", "image"):
            if most[kind] and est.orders.get(kind) is not None:
                parts.append(est.orders[kind][0][h, :most[kind]])
        per_head.append(torch.unique(torch.cat(parts)))
    width = max(max(c.numel() for c in per_head), 1)
    out = torch.full((heads, width), n, dtype=torch.long)
    for h, cols in enumerate(per_head):
        out[h, :cols.numel()] = cols
    return out


__all__ = ["BUDGET_MINIMUM", "GRID_PHASES", "LAST_Q", "NEAR_SLASHES", "PATTERN_ORDER", "SINK_COLUMNS", "Candidate",
           "Estimates", "SearchSpace", "block_groups", "block_mass_tiles", "block_topk_tiles", "budget_count",
           "budget_counts", "build_layout", "candidate", "catalogue", "estimate", "grid_slashes", "image_row_mask",
           "needed_columns", "pooled_block_scores", "priority_order", "resize_tile_mask", "scaled_minimum",
           "slash_windows", "static_tiles", "vertical_slash_scores"]
