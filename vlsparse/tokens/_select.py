"""Tensor helpers shared by the token-reduction methods: ranking, diversity, grids, per-image groups."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def top_sorted(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores (ties: lower index first), returned in increasing index order."""
    k = max(0, min(int(k), scores.numel()))
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return torch.sort(order[:k]).values


def image_groups(image_index: Tensor | None, n_image: int) -> list[Tensor]:
    """Indices (into the image tokens) of each image, in image order; one group without ``image_index``."""
    if image_index is None:
        return [torch.arange(n_image)]
    image_index = torch.as_tensor(image_index, dtype=torch.long).flatten().cpu()
    if image_index.numel() != n_image:
        raise ValueError(f"image_index has {image_index.numel()} entries for {n_image} image tokens")
    return [(image_index == value).nonzero().flatten() for value in torch.unique(image_index).tolist()]


def split_budget(sizes: list[int], budget: int) -> list[int]:
    """Split ``budget`` over groups in proportion to ``sizes`` (largest remainder), never above a group's size."""
    total = sum(sizes)
    if total == 0 or budget <= 0:
        return [0] * len(sizes)
    budget = min(budget, total)
    exact = [budget * size / total for size in sizes]
    shares = [min(size, math.floor(value)) for size, value in zip(sizes, exact)]
    order = sorted(range(len(sizes)), key=lambda i: (shares[i] - exact[i], i))
    left = budget - sum(shares)
    while left > 0:
        progressed = False
        for i in order:
            if left and shares[i] < sizes[i]:
                shares[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return shares


def grid_of(count: int, grid: tuple[int, int] | None) -> tuple[int, int] | None:
    """The (rows, cols) layout of ``count`` raster-ordered tokens: ``grid`` if it fits, else a square, else None."""
    if grid is not None and grid[0] * grid[1] == count:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(count)
    return (side, side) if side * side == count else None


def strided_grid(count: int, grid: tuple[int, int] | None, stride: int) -> Tensor:
    """Every ``stride``-th row and column of a raster grid of ``count`` tokens (rows 0, s, 2s, ...).

    Without a known 2-D layout, every ``stride**2``-th token of the sequence (same density).
    """
    layout = grid_of(count, grid)
    if layout is None:
        return torch.arange(0, count, max(1, stride * stride))
    rows, cols = layout
    r = torch.arange(0, rows, stride)
    c = torch.arange(0, cols, stride)
    return (r[:, None] * cols + c[None, :]).flatten()


def _unit(features: Tensor) -> Tensor:
    return F.normalize(features.float(), dim=-1, eps=1e-12)


def nearest_neighbour_distance(unit: Tensor, block: int = 1024) -> Tensor:
    """Cosine distance of every row of ``unit`` (L2-normalised) to its nearest other row, in row blocks."""
    n = unit.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=unit.device)
    for start in range(0, n, block):
        sim = unit[start:start + block] @ unit.T
        rows = torch.arange(sim.shape[0], device=unit.device)
        sim[rows, rows + start] = float("-inf")  # exclude self
        out[start:start + block] = 1.0 - sim.max(dim=1).values
    return out


def greedy_diverse(features: Tensor, k: int, *, first: int | None = None, objective: str = "k_center") -> Tensor:
    """Greedy diverse subset of ``k`` rows of ``features`` under cosine distance; indices in pick order.

    ``k_center`` (max-min): each pick maximises its distance to the nearest already-picked
    row. ``max_sum``: each pick minimises its summed cosine similarity to the picked rows.
    The first pick is ``first``, or (DivPrune) the row whose nearest neighbour is farthest.
    """
    n = features.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    unit = _unit(features)
    start = int(torch.argmax(nearest_neighbour_distance(unit))) if first is None else int(first)
    picks = [start]
    taken = torch.zeros(n, dtype=torch.bool, device=unit.device)
    taken[start] = True
    if objective == "k_center":
        score = 1.0 - unit @ unit[start]  # distance to the nearest pick
        for _ in range(k - 1):
            nxt = int(torch.argmax(score.masked_fill(taken, float("-inf"))))
            picks.append(nxt)
            taken[nxt] = True
            score = torch.minimum(score, 1.0 - unit @ unit[nxt])
    elif objective == "max_sum":
        score = unit @ unit[start]  # summed similarity to the picks
        for _ in range(k - 1):
            nxt = int(torch.argmin(score.masked_fill(taken, float("inf"))))
            picks.append(nxt)
            taken[nxt] = True
            score = score + unit @ unit[nxt]
    else:
        raise ValueError(f"objective must be 'k_center' or 'max_sum', not {objective!r}")
    return torch.tensor(picks, dtype=torch.long)
