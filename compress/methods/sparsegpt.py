"""SparseGPT as a registered method (Frantar & Alistarh, 2023): prune, then correct the kept weights.

The layer's reconstruction error ``||W X - W' X||^2`` has Hessian ``H = X X^T`` (per
row, the same for every row). Columns are processed left to right. When column ``j``
loses some weights, the error that causes is spread over the columns not yet processed,
through row ``j`` of the upper Cholesky factor ``U`` of ``H^-1`` (the optimal brain
surgeon update with the processed columns frozen). This is the paper's algorithm:

- ``H`` is damped by ``damp`` times its mean diagonal; inputs that never fire are dropped;
- columns go in blocks of ``block`` (lazy batch updates): inside a block the update is
  applied column by column, and the rest of the matrix gets the block's errors in one
  matrix product at the end;
- the mask of a block is chosen when the block starts, from ``w^2 / U_jj^2`` (the
  weight's OBS saliency) on the weights as updated so far. N:M chooses each group of M
  columns when it starts.

One difference from the reference code: unstructured counts are exact per row. Row ``r``
loses ``row_prune_counts`` weights over the matrix, spread evenly over the blocks, so a
layer loses exactly the ``prune`` weights its allocation gave it (the reference uses one
threshold per block, over all rows).

Statistics: the running sum ``X X^T`` of the layer's inputs, in fp32 (``C_in^2`` floats).
"""

from __future__ import annotations

import torch

from vlsparse.compress.methods import LayerUpdate
from vlsparse.compress.wanda import row_prune_counts

BLOCK = 128
"""Columns per lazy-update block (the paper's choice)."""

DAMP = 0.01
"""Dampening of ``H``, as a fraction of its mean diagonal (the paper's choice)."""


class HessianStats:
    """Running ``sum_t x_t x_t^T`` (fp32) and token count of one Linear's input."""

    def __init__(self) -> None:
        self.xxt: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        product = flat.T @ flat
        self.xxt = product if self.xxt is None else self.xxt.add_(product)
        self.tokens += flat.shape[0]


def new_stats(linear) -> HessianStats:
    return HessianStats()


def inverse_hessian_factor(xxt: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(``U``, dead): the upper Cholesky factor of the damped ``H^-1``, and the inputs that never fired.

    Dead inputs get a unit diagonal so ``H`` stays invertible; their weights are free to
    prune (they multiply zeros). A ``H`` too ill-conditioned to factor is damped tenfold
    more, up to three times.
    """
    h = xxt.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    mean_diag = float(torch.diagonal(h).mean())
    for attempt in range(4):
        damped = h + torch.eye(h.shape[0], dtype=h.dtype) * (damp * 10 ** attempt * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, dead
    raise ValueError("the layer's input Hessian cannot be factored even after dampening")


def block_prune_counts(per_row: torch.Tensor, cols: int, start: int, end: int) -> torch.Tensor:
    """How many of each row's ``per_row`` prunes fall in columns [start, end): an even split."""
    return (per_row * end) // cols - (per_row * start) // cols


def lowest_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Prune-mask (True = prune) of the ``counts[r]`` lowest scores of each row (ties: lower column)."""
    order = torch.argsort(scores, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], dtype=order.dtype).expand_as(order))
    return rank < counts.unsqueeze(1)


def sparsegpt(weight: torch.Tensor, xxt: torch.Tensor, prune: int | None = None,
              structure: tuple[int, int] | None = None, block: int = BLOCK,
              damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep-mask, new weight) of one Linear weight ``[C_out, C_in]`` given its inputs' ``X X^T``.

    Unstructured: exactly ``prune`` weights go (``row_prune_counts`` per row). N:M:
    ``structure`` = (N, M), N of every M consecutive inputs go. The new weight is zero
    where the mask is False and returned in ``weight``'s dtype.
    """
    if structure is None and prune is None:
        raise ValueError("unstructured pruning needs a count")
    rows, cols = weight.shape
    if xxt.shape != (cols, cols):
        raise ValueError(f"input statistics of shape {tuple(xxt.shape)} do not match weight {tuple(weight.shape)}")
    if structure is not None:
        if cols % structure[1]:
            raise ValueError(f"{cols} input columns do not split into groups of {structure[1]}")
        block = max(structure[1], block // structure[1] * structure[1])  # groups never straddle blocks
    upper, dead = inverse_hessian_factor(xxt, damp)
    upper = upper.float()
    w = weight.detach().float().clone()
    w[:, dead] = 0
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    per_row = row_prune_counts(rows, prune) if structure is None else None
    for start in range(0, cols, block):
        end = min(cols, start + block)
        w_block = w[:, start:end].clone()
        u_block = upper[start:end, start:end]
        errors = torch.zeros_like(w_block)
        if per_row is not None:
            saliency = w_block.square() / torch.diagonal(u_block).square().unsqueeze(0)
            pruned[:, start:end] = lowest_per_row(saliency, block_prune_counts(per_row, cols, start, end))
        for i in range(end - start):
            column = start + i
            if structure is not None and i % structure[1] == 0:
                n, m = structure
                group = w_block[:, i:i + m].square() / torch.diagonal(u_block)[i:i + m].square().unsqueeze(0)
                lowest = torch.topk(group, n, dim=1, largest=False).indices
                pruned[:, column:column + m].scatter_(1, lowest, True)
            kept = torch.where(pruned[:, column], torch.zeros_like(w_block[:, i]), w_block[:, i])
            error = (w_block[:, i] - kept) / u_block[i, i]
            w_block[:, i:] -= error.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            w_block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = w_block
        w[:, end:] -= errors @ upper[start:end, end:]
    keep = ~pruned
    return keep, w.masked_fill_(pruned, 0).to(weight.dtype)


def prune_layer(weight: torch.Tensor, stats: HessianStats, prune: int,
                structure: tuple[int, int] | None) -> LayerUpdate:
    """SparseGPT's keep-mask and the corrected kept weights."""
    keep, new_weight = sparsegpt(weight, stats.xxt, prune=prune, structure=structure)
    return LayerUpdate(keep, new_weight)
