"""Score every candidate on one layer of one calibration input: exact recall and block-layout density.

``evaluate_layer`` runs the online estimators, collects tile and column mass
in one row-blockwise pass (``recall.tile_stats``), then builds each candidate's
layout per head and reads its recall and density off those statistics. The
indices are estimated the way the runtime will (last 64 queries, pooled
blocks) while recall is measured over *all* query rows: the honest recall.
``static`` candidates depend on every sample and are scored afterwards by
``evaluate_static`` from the tile masses kept here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vlsparse.search.candidates import (Candidate, build_layout, estimate, needed_columns, resize_tile_mask,
                                        static_tiles)
from vlsparse.search.recall import BLOCK, STEP_ELEMENTS, causal_tiles, layout_scores, tile_stats


@dataclass
class LayerScores:
    """One layer of one input: ``recall``, ``density`` and ``tail`` (recall over the last query
    block's rows) ``[H, C]`` over the online candidates, and ``tile_mass`` ``[H, nb, nb]`` (for static masks)."""

    n: int
    recall: torch.Tensor
    density: torch.Tensor
    tile_mass: torch.Tensor
    tail: torch.Tensor


def evaluate_layer(q: torch.Tensor, k: torch.Tensor, scale: float, candidates: list[Candidate], spans=(),
                   last_q: int = 64, block: int = BLOCK, max_elements: int = STEP_ELEMENTS,
                   dense_tail: bool = False) -> LayerScores:
    """Score ``candidates`` (no ``static``) for every head. ``q``: ``[H, N, d]``, ``k``: ``[H_kv, N, d]``;
    ``dense_tail``: every layout runs its last query block dense (as the runtime will)."""
    est = estimate(q, k, scale, spans, last_q=last_q, block=block)
    stats = tile_stats(q, k, scale, needed_columns(est, candidates), groups=est.groups, block=block,
                       max_elements=max_elements)
    causal = causal_tiles(est.blocks.shape[-1])
    heads = q.shape[0]
    recall = torch.ones(heads, len(candidates), dtype=torch.float64)
    density = torch.ones(heads, len(candidates), dtype=torch.float64)
    tail = torch.ones(heads, len(candidates), dtype=torch.float64)
    for h in range(heads):
        for c, cand in enumerate(candidates):
            if cand.pattern == "dense":
                continue
            layout = replace(build_layout(cand, est, h), dense_tail=dense_tail)
            recall[h, c], density[h, c], tail[h, c] = layout_scores(stats, h, layout, causal)
    return LayerScores(n=q.shape[1], recall=recall, density=density, tile_mass=stats.tile_mass, tail=tail)


def _on_grid(mass: torch.Tensor, nb: int) -> torch.Tensor:
    """A sample's tile mass ``[nb_s, nb_s]`` on an ``nb x nb`` grid (nearest tile centre), per row of the sample."""
    src = mass.shape[0]
    mass = mass.double() / float(mass.sum())
    if src == nb:
        return mass
    idx = ((torch.arange(nb, dtype=torch.float64) + 0.5) * src / nb).long().clamp(max=src - 1)
    return mass[idx][:, idx]


def mean_tile_mass(tile_masses: list[torch.Tensor], nb: int) -> torch.Tensor:
    """Average of per-sample tile masses ``[nb_s, nb_s]`` on a common ``nb x nb`` grid (nearest tile),
    each normalised by its sample's row count so long and short samples weigh the same."""
    return sum(_on_grid(m, nb) for m in tile_masses) / max(len(tile_masses), 1)


def evaluate_static(tile_masses: list[torch.Tensor], lengths: list[int], select: float | list[float],
                    nb: int, dense_tail: bool = False):
    """SparseD static masks for one head, and their recall and density on each sample.

    The stored mask (``nb x nb`` tiles, the calibration length) is chosen from all
    samples. With two or more samples each sample is scored with a mask chosen
    from the *other* samples (leave-one-out), so the recall is not in-sample.
    Returns ``(mask, recalls, densities, tails)`` (``tails``: the mask's own recall over each sample's
    last query block, also with ``dense_tail``), or a list of them when ``select`` is a list. ``dense_tail``: each sample's
    last query block keeps every causal tile (the stored mask is unchanged; the runtime adds it).
    """
    selects = select if isinstance(select, (list, tuple)) else [select]
    on_grid = [_on_grid(m, nb) for m in tile_masses]
    total = sum(on_grid)
    count = len(on_grid)
    held_out = [(total - own) / (count - 1) if count > 1 else total for own in on_grid]
    out = []
    for share in selects:
        mask = static_tiles(total / count, share)
        recalls, densities, tails = [], [], []
        for mass, n, others in zip(tile_masses, lengths, held_out):
            nbs = mass.shape[0]
            tiles = resize_tile_mask(static_tiles(others, share), nbs)
            tails.append(float((mass[-1] * tiles[-1]).sum()) / (n - (nbs - 1) * BLOCK))  # the mask's own
            if dense_tail:
                tiles = tiles.clone()
                tiles[-1] = True
            recalls.append(float((mass * tiles).sum()) / n)
            densities.append(float(tiles.sum()) / (nbs * (nbs + 1) / 2))
        out.append((mask, recalls, densities, tails))
    return out if isinstance(select, (list, tuple)) else out[0]
