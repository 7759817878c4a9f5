"""Shared inputs for the kernel tests: random q/k/v, index lists of every pattern, the error budget."""

from __future__ import annotations

import torch

from vlsparse.kernels.indices import a_shape_index, dense_index
from vlsparse.patterns.layer import layer_index
from vlsparse.kernels.reference import sparse_attention_reference
from vlsparse.profile import HeadProfile

# one query head per pattern (8 query heads); budgets are fractions of N
EVERY_PATTERN = [
    HeadProfile("dense"),
    HeadProfile("a_shape", budget={"sink": 0.02, "local": 0.15}),
    HeadProfile("vertical_slash", budget={"vertical": 0.04, "slash": 0.03}),
    HeadProfile("block_sparse", budget={"blocks": 0.3}),
    HeadProfile("block_sparse", budget={"mass": 0.6}),
    HeadProfile("grid", budget={"local": 0.05}, params={"stride": 70, "phase": 1}),
    HeadProfile("modality_vertical_slash", budget={"text_vertical": 0.02, "text_slash": 0.02,
                                                   "image_vertical": 0.05, "image_slash": 0.05}),
    HeadProfile("static", budget={"select": 0.3}, mask="static0"),
]


def qkv(n: int, heads: int = 8, kv_heads: int = 2, head_dim: int = 32, batch: int = 1, seed: int = 0,
        dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, n, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, n, head_dim, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def every_pattern_index(q: torch.Tensor, k: torch.Tensor):
    """Lists for 8 query heads, one pattern each (image span in the middle third)."""
    n = q.shape[2]
    static = torch.rand(4, 4, generator=torch.Generator().manual_seed(3)) < 0.4
    return layer_index(EVERY_PATTERN, q.float(), k.float(), spans=[(n // 3, 2 * n // 3)], masks={"static0": static})


def diagonal_only_index(n: int, heads: int):
    """Density 'zero': only the diagonal blocks (causal)."""
    return a_shape_index(n, sink=0, local=1, heads=heads)


def all_causal_index(n: int, heads: int):
    """Density one: every causal pair."""
    return dense_index(n, heads)


def within_budget(out: torch.Tensor, q, k, v, index, scale: float) -> tuple[float, float]:
    """(err, budget): err = max|out - fp32 reference|, budget = 2 * err(torch in q's dtype) + 1e-5."""
    ref = sparse_attention_reference(q.float(), k.float(), v.float(), index, scale)
    same = sparse_attention_reference(q, k, v, index, scale, upcast=False)
    err = float((out.float() - ref).abs().max())
    budget = 2 * float((same.float() - ref).abs().max()) + 1e-5
    return err, budget
