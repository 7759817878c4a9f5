"""The Triton kernel under the interpreter (TRITON_INTERPRET=1) against the reference, under the error budget.

Small shapes only: the interpreter runs each program in numpy.
"""

from __future__ import annotations

import os
import sys

_imported_too_early = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if _imported_too_early:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file on its own",
                allow_module_level=True)
pytest.importorskip("triton")

from kernel_cases import all_causal_index, diagonal_only_index, every_pattern_index, qkv, within_budget  # noqa: E402

from vlsparse.kernels.dispatch import sparse_attention  # noqa: E402
from vlsparse.kernels.indices import a_shape_index  # noqa: E402
from vlsparse.kernels.triton_sparse import sparse_prefill_attention  # noqa: E402


def run(q, k, v, index, scale):
    index = index.expand(q.shape[0])
    return sparse_prefill_attention(q, k, v, index.block_count, index.block_offset, index.column_count,
                                    index.column_index, scale, index.block_size)


@pytest.mark.parametrize("n", [100, 130, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_every_pattern_within_error_budget(n, dtype):
    q, k, v = qkv(n, heads=8, kv_heads=2, dtype=dtype)
    index = every_pattern_index(q, k)
    scale = 1 / math.sqrt(32)
    out = run(q, k, v, index, scale)
    assert out.dtype == dtype
    err, budget = within_budget(out, q, k, v, index, scale)
    assert err <= budget, f"err {err:.3g} > budget {budget:.3g}"


@pytest.mark.parametrize("make", [diagonal_only_index, all_causal_index])
def test_triton_density_zero_and_one_with_gqa(make):
    q, k, v = qkv(130, heads=4, kv_heads=2, head_dim=64)
    index = make(130, 4)
    err, budget = within_budget(run(q, k, v, index, 0.125), q, k, v, index, 0.125)
    assert err <= budget


def test_triton_odd_head_dim_batch_and_transposed_layout_through_dispatch():
    n, h, hkv, d = 100, 4, 2, 48  # head dim padded to 64 inside the kernel
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, n, h, d, generator=gen).transpose(1, 2)
    k = torch.randn(2, n, hkv, d, generator=gen).transpose(1, 2)
    v = torch.randn(2, n, hkv, d, generator=gen).transpose(1, 2)
    index = a_shape_index(n, [3, 0, 10, 1], [70, 1, 30, 100], heads=h)
    out = sparse_attention(q, k, v, index, 0.15, backend="triton")
    err, budget = within_budget(out, q, k, v, index.expand(2), 0.15)
    assert err <= budget
