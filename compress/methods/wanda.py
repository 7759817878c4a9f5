"""Wanda as a registered method (Sun et al., 2023): ``S_ij = |W_ij| * ||X_j||_2``, lowest per row (or N:M) go.

Statistics: the running sum ``sum_t x_tj^2`` of each input feature, in fp32.
The tensor functions (scores, masks) are ``vlsparse.compress.wanda``.
"""

from __future__ import annotations

import torch

from vlsparse.compress.methods import LayerUpdate
from vlsparse.compress.wanda import update_sq_norm, wanda_mask


class SqNormStats:
    """Running ``||X_j||^2`` (fp32) and token count of one Linear's input."""

    def __init__(self) -> None:
        self.sum_sq: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        self.sum_sq, self.tokens = update_sq_norm(self.sum_sq, self.tokens, x)


def new_stats(linear) -> SqNormStats:
    return SqNormStats()


def prune_layer(weight: torch.Tensor, stats: SqNormStats, prune: int,
                structure: tuple[int, int] | None) -> LayerUpdate:
    """Wanda's keep-mask; the kept weights are unchanged."""
    return LayerUpdate(wanda_mask(weight, stats.sum_sq, prune=prune, structure=structure))
