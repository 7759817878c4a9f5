"""Wanda pruning as pure tensor functions: scores, per-row masks, N:M masks.

Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs"):

    S_ij = |W_ij| * ||X_j||_2

where ``W`` is a Linear weight of shape ``[C_out, C_in]`` and ``||X_j||_2`` is
the L2 norm of input feature ``j`` over all calibration tokens. Weights are
compared within each **output row**; the lowest-scoring ones are zeroed.

N:M (``structure="2:4"``, ``"4:8"``): in every group of M consecutive input
columns of a row, the N lowest-scoring weights are zeroed (so 2:4 keeps 2 of
every 4 and prunes exactly half).

Masks are boolean with ``True`` = keep. Nothing here touches modules or files:
the stateful half (hooks, the sequential loop) is ``vlsparse.compress.sequential``.
"""

from __future__ import annotations

import torch

from vlsparse.errors import InputError, param

STRUCTURES = ("unstructured", "2:4", "4:8")


def parse_structure(structure: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M) with 0 < N < M (N weights pruned per M)."""
    if structure == "unstructured":
        return None
    try:
        n_text, m_text = structure.split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise InputError(f"unknown {param('structure')} {structure!r}", "use unstructured, 2:4 or 4:8") from None
    if not 0 < n < m:
        raise InputError(f"{param('structure')} {structure!r} needs 0 < N < M", "use unstructured, 2:4 or 4:8")
    return n, m


def update_sq_norm(sum_sq: torch.Tensor | None, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Accumulate ``sum_t x_tj^2`` over the tokens of ``x`` (``[..., C_in]``), in fp32.

    Returns the new (sum, token count). Keeping the sum, not the mean, lets
    batches of any size be added in any order; ``||X_j||^2`` is the sum itself.
    """
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    add = (flat * flat).sum(dim=0)
    return (add if sum_sq is None else sum_sq + add), count + flat.shape[0]


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(||X_j||^2)`` broadcast over rows; ``input_sq_norm`` has shape ``[C_in]``."""
    if input_sq_norm.shape != weight.shape[-1:]:
        raise ValueError(f"input norms of shape {tuple(input_sq_norm.shape)} do not match weight {tuple(weight.shape)}")
    return weight.detach().float().abs() * input_sq_norm.float().clamp_min(0).sqrt().unsqueeze(0)


def row_prune_counts(rows: int, total: int) -> torch.Tensor:
    """How many weights each of ``rows`` rows loses so that exactly ``total`` go.

    Every row loses ``total // rows`` or one more; the extra ones are spread
    evenly over the rows (row ``i`` gets one when ``floor((i+1)r/R) > floor(i r/R)``).
    """
    if not 0 <= total:
        raise ValueError("total must be >= 0")
    base, extra = divmod(total, rows)
    idx = torch.arange(rows, dtype=torch.int64)
    bump = ((idx + 1) * extra) // rows - (idx * extra) // rows
    return base + bump


def row_mask(scores: torch.Tensor, prune_per_row: int | torch.Tensor) -> torch.Tensor:
    """Keep-mask zeroing the ``prune_per_row`` lowest scores of each row.

    ``prune_per_row`` is one count for all rows (Wanda: ``floor(C_in * s)``)
    or one per row (``row_prune_counts``). Ties break toward lower column index.
    """
    rows, cols = scores.shape
    counts = torch.as_tensor(prune_per_row, dtype=torch.int64).expand(rows)
    if int(counts.max()) > cols or int(counts.min()) < 0:
        raise ValueError(f"cannot prune {int(counts.max())} of {cols} columns")
    order = torch.argsort(scores, dim=1, stable=True)  # ascending: lowest first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(cols, dtype=order.dtype).expand(rows, cols))
    return rank >= counts.unsqueeze(1)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask zeroing the ``n`` lowest scores in every group of ``m`` consecutive columns."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns do not split into groups of {m}")
    groups = scores.reshape(rows, cols // m, m)
    lowest = torch.topk(groups, n, dim=-1, largest=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, lowest, False)
    return keep.reshape(rows, cols)


def wanda_mask(weight: torch.Tensor, input_sq_norm: torch.Tensor, prune: int | None = None,
               structure: tuple[int, int] | None = None, chunk_elements: int = 1 << 18) -> torch.Tensor:
    """Wanda keep-mask for one Linear weight.

    Unstructured: exactly ``prune`` weights of the matrix go, spread over the
    rows by ``row_prune_counts`` and chosen per row by score. N:M: ``structure``
    = (N, M) and ``prune`` is ignored (N/M of every row goes). Rows are scored
    in chunks of about ``chunk_elements`` weights, so the temporaries (scores,
    sort indices) stay small whatever the matrix size.
    """
    if structure is None and prune is None:
        raise ValueError("unstructured pruning needs a count")
    rows, cols = weight.shape
    counts = row_prune_counts(rows, prune) if structure is None else None
    keep = torch.empty((rows, cols), dtype=torch.bool)
    step = max(1, chunk_elements // max(1, cols))
    for start in range(0, rows, step):
        end = min(rows, start + step)
        scores = wanda_scores(weight[start:end], input_sq_norm)
        keep[start:end] = nm_mask(scores, *structure) if structure is not None else row_mask(scores, counts[start:end])
    return keep
