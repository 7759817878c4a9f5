"""Triton kernel for sparse prefill attention over MInference-style index lists.

One program per (query block, batch * head). It walks the query block's listed key
windows (``block_offset``, ``block_size`` keys each), then its extra key columns
(``column_index``, gathered ``BLOCK_N`` at a time), keeping one online-softmax state
(running max ``m``, normaliser ``l``, accumulator ``acc``; base-2 exponentials with
``log2(e)`` folded into the scale). Causality (key <= row), keys outside ``[0, N)``, rows
past N and head-dim padding (``BLOCK_D`` = next power of two >= 16) are masked. GQA:
query head h reads KV head ``h // (H // Hkv)``; K and V are never repeated. Any strides.

Triton is imported lazily (``_kernel()`` imports the jit code in ``_triton_kernel``), so
the package imports without it. On a CPU
machine the kernel runs under the interpreter: set ``TRITON_INTERPRET=1`` in the
environment before triton is first imported.
"""

from __future__ import annotations

import os


import torch
from torch import Tensor

LOG2E = 1.4426950408889634


def _kernel():
    """The jit kernel; the first call imports triton (``vlsparse.kernels._triton_kernel``)."""
    from vlsparse.kernels import _triton_kernel

    return _triton_kernel._sparse_prefill_kernel


def _launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor, block_count: Tensor, block_offset: Tensor,
            column_count: Tensor, column_index: Tensor, scale: float, block_size: int) -> None:
    kernel = _kernel()
    b, h, n, d = q.shape
    hkv = k.shape[1]
    block_d = max(16, 1 << (d - 1).bit_length())
    grid = ((n + block_size - 1) // block_size, b * h)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    dot_fp32 = q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    kernel[grid](
        q, k, v, out,
        block_count, block_offset, column_count, column_index,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *block_count.stride(), *block_offset.stride(), *column_count.stride(), *column_index.stride(),
        h, n, d, h // hkv, scale * LOG2E,
        BLOCK_M=block_size, BLOCK_N=block_size, BLOCK_D=block_d, INPUT_PRECISION=precision, DOT_FP32=dot_fp32,
        num_warps=4 if d <= 64 else 8, num_stages=2,
    )


def sparse_prefill_attention(
    q: Tensor,  # [B, H, N, D], fp16 / bf16 / fp32, any strides, D in 16..256
    k: Tensor,  # [B, Hkv, N, D], H % Hkv == 0
    v: Tensor,  # [B, Hkv, N, D]
    block_count: Tensor,  # [B, H, NQB] int32, NQB = ceil(N / block_size)
    block_offset: Tensor,  # [B, H, NQB, MAXB] int32, first key of each window
    column_count: Tensor,  # [B, H, NQB] int32
    column_index: Tensor,  # [B, H, NQB, MAXC] int32, ascending
    scale: float,  # softmax scale, usually 1 / sqrt(D)
    block_size: int = 64,  # rows per query block = keys per window (power of two >= 16)
    upcast: bool = True,  # accepted for parity with the reference; the kernel always accumulates in fp32
) -> Tensor:  # [B, H, N, D], q's dtype
    """Sparse prefill attention with the Triton kernel (see the module docstring)."""
    if q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} > 256 is not supported")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    out = torch.empty_like(q)
    lists = [t.to(device=q.device, dtype=torch.int32) for t in (block_count, block_offset, column_count, column_index)]
    _launch(q, k, v, out, *lists, float(scale), block_size)
    return out


def triton_available() -> bool:
    """True when triton imports (it still needs a GPU or ``TRITON_INTERPRET=1`` to run)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["sparse_prefill_attention", "triton_available"]
