"""The torch reference (vlsparse.kernels.reference) against attention built independently."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kernel_cases import all_causal_index, every_pattern_index, qkv

from vlsparse.kernels.indices import SparseIndex
from vlsparse.kernels.reference import sparse_prefill_attention


def mask_by_loops(index: SparseIndex, n: int) -> torch.Tensor:
    """[B, H, N, N] from the list semantics, with plain loops: window keys off..off+63 and
    columns, for every row of the query block, then causal."""
    b, h, nqb = index.shape
    bs = index.block_size
    mask = torch.zeros(b, h, n, n, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(nqb):
                keys = []
                for j in range(int(index.block_count[bi, hi, i])):
                    off = int(index.block_offset[bi, hi, i, j])
                    keys += [t for t in range(off, off + bs) if 0 <= t < n]
                keys += index.column_index[bi, hi, i, : int(index.column_count[bi, hi, i])].tolist()
                for r in range(i * bs, min(i * bs + bs, n)):
                    for t in keys:
                        if t <= r:
                            mask[bi, hi, r, t] = True
    return mask


def attention_float64(q, k, v, mask, scale):
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


def call(q, k, v, index, scale, **kw):
    return sparse_prefill_attention(q, k, v, index.block_count, index.block_offset, index.column_count,
                                    index.column_index, scale, index.block_size, **kw)


def test_reference_equals_masked_softmax_built_with_loops():
    for n in (100, 130):
        q, k, v = qkv(n, heads=8, kv_heads=2)
        index = every_pattern_index(q, k)
        want = attention_float64(q, k, v, mask_by_loops(index, n), 1 / math.sqrt(32))
        got = call(q, k, v, index, 1 / math.sqrt(32))
        assert got.dtype == torch.float32
        assert float((got.double() - want).abs().max()) < 1e-5


def test_reference_density_one_is_causal_sdpa():
    q, k, v = qkv(150, heads=4, kv_heads=2)
    index = all_causal_index(150, 4)
    got = call(q, k, v, index, 0.3)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True,
                                          scale=0.3)
    assert float((got - want).abs().max()) < 1e-5


def test_reference_upcast_false_computes_in_the_input_dtype():
    q, k, v = qkv(100, heads=4, kv_heads=2, dtype=torch.bfloat16)
    index = all_causal_index(100, 4)
    up = call(q, k, v, index, 0.2)
    low = call(q, k, v, index, 0.2, upcast=False)
    assert up.dtype == low.dtype == torch.bfloat16
    assert float((up.float() - low.float()).abs().max()) > 0  # bf16 matmuls round differently
