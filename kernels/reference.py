"""Torch references for the sparse prefill kernels: simple, slow, obviously right.

``sparse_prefill_attention`` has the name and signature of the Triton kernel in
``vlsparse.kernels.triton_sparse``. It expands the index lists into the dense boolean
[B, H, N, N] mask they imply (``indices.index_mask``: listed windows and columns, causal)
and runs masked softmax attention, in fp32 when ``upcast`` (the default):

    out[b, h, i] = softmax_j(scale * q[b, h, i] . k[b, h // group, j] | mask[b, h, i, j]) @ v[b, h // group]

Memory is O(B H N^2): for tests and small checks only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlsparse.kernels.indices import SparseIndex, index_mask


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, upcast: bool = True) -> Tensor:
    """Dense attention under a boolean mask [B or 1, H or 1, N, N]; rows with no key give 0.

    q: [B, H, N, D]; k, v: [B, Hkv, N, D] (H a multiple of Hkv). Output in q's dtype.
    """
    h, hkv = q.shape[1], k.shape[1]
    dtype = torch.float32 if upcast else q.dtype
    kk = k.to(dtype).repeat_interleave(h // hkv, dim=1)
    vv = v.to(dtype).repeat_interleave(h // hkv, dim=1)
    scores = torch.matmul(q.to(dtype), kk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(dtype)
    return torch.matmul(probs, vv).to(q.dtype)


def sparse_prefill_attention(q: Tensor, k: Tensor, v: Tensor, block_count: Tensor, block_offset: Tensor,
                             column_count: Tensor, column_index: Tensor, scale: float, block_size: int = 64,
                             upcast: bool = True) -> Tensor:
    """Reference sparse prefill attention (same contract as the Triton kernel).

    q: [B, H, N, D]; k, v: [B, Hkv, N, D]; block_count, column_count: [B, H, NQB];
    block_offset: [B, H, NQB, MAXB]; column_index: [B, H, NQB, MAXC]; returns [B, H, N, D].
    """
    n = q.shape[2]
    index = SparseIndex(block_count, block_offset, column_count, column_index, block_size)
    mask = index_mask(index, n)
    return masked_attention(q, k, v, mask, scale, upcast)


def sparse_attention_reference(q: Tensor, k: Tensor, v: Tensor, index: SparseIndex, scale: float,
                               upcast: bool = True) -> Tensor:
    """:func:`sparse_prefill_attention` taking a ``SparseIndex``."""
    return sparse_prefill_attention(q, k, v, index.block_count, index.block_offset, index.column_count,
                                    index.column_index, scale, index.block_size, upcast)


def dense_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, upcast: bool = True) -> Tensor:
    """Plain causal attention, the density-1 limit."""
    n = q.shape[2]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return masked_attention(q, k, v, mask, scale, upcast)


__all__ = ["dense_causal_attention", "masked_attention", "sparse_attention_reference", "sparse_prefill_attention"]
