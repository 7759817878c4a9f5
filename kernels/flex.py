"""Backend ``"flex"``: the index lists through compiled ``torch.nn.attention.flex_attention``.

The lists become a ``BlockMask`` (``vlsparse.kernels.cpu.flex_block_mask``: aligned key blocks
fully kept are full blocks, the others partial with a token-level ``mask_mod``), so the result
is the reference's up to float error, columns exact.

Compiled kernels are cached per process. There is one ``torch.compile`` wrapper
(:func:`compiled_flex_attention`); TorchDynamo keys what it compiled on guards over its
inputs: the shapes of q, k, v and of the BlockMask's tensors, dtype, device, strides, block
size and ``enable_gqa``. The lists themselves are data (tensor values and a fresh ``mask_mod``
closure of the same code), so the layers of one prefill, which share the shapes, compile once;
a new prompt length compiles again (~3 s once the first compile of this process, 10-40 s,
is done; Inductor also keeps compiled code on disk across processes). To keep that rare,
:func:`flex_attention_sparse` fixes everything but the length: fp32 contiguous inputs on CPU,
and the length rounded up to :func:`flex_length` (quarter-octave steps: at most 25% more rows;
padded query blocks list no keys, so they cost copies, not attention). Dynamic shapes are not
used: with torch 2.13 on CPU, recompiling flex_attention with a dynamic length fails in the
C++ compiler. Past Dynamo's default of 8 recompiles a function falls back to eager
``flex_attention``, which builds the N x N scores, so calls here raise the limit to
``max_shapes`` and fail (``RecompileLimit``) rather than run eagerly beyond it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from vlsparse.kernels.indices import SparseIndex

MAX_SHAPES = 64


class RecompileLimit(RuntimeError):
    """The process compiled ``flex_attention`` for ``max_shapes`` shapes and would need another."""


def flex_available() -> bool:
    """Whether this torch has ``flex_attention`` (torch 2.5 and later)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def compiled_flex_attention():
    """The process's one ``torch.compile(flex_attention, dynamic=False)`` (see the module docstring)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_length(n: int, block_size: int = 64) -> int:
    """``n`` rounded up to a multiple of ``max(block_size, 2**ceil(log2 n) / 8)``: four lengths
    per octave (8,192 and 32,768 stay as they are; 8,193 becomes 10,240; 300 becomes 320)."""
    step = max(block_size, (1 << max(n - 1, 0).bit_length()) // 8)
    return -(-n // step) * step


def pad_index(index: SparseIndex, nqb: int) -> SparseIndex:
    """``index`` with query blocks appended up to ``nqb`` that list nothing."""
    extra = nqb - index.shape[2]
    if extra <= 0:
        return index

    def more(t: Tensor, dims: int) -> Tensor:
        return F.pad(t, (0, 0) * (dims - 1) + (0, extra))

    return SparseIndex(more(index.block_count, 1), more(index.block_offset, 2), more(index.column_count, 1),
                       more(index.column_index, 2), index.block_size)


def flex_mask(index: SparseIndex, q: Tensor):
    """The ``BlockMask`` :func:`flex_attention_sparse` runs ``index`` with, for queries ``q`` [B, H, N, D]:
    padded to :func:`flex_length` rows, on q's device. Build it once to time the kernel alone."""
    from vlsparse.kernels.cpu import flex_block_mask

    length = flex_length(q.shape[2], index.block_size)
    lists = pad_index(index.to("cpu").expand(q.shape[0]), length // index.block_size)
    return flex_block_mask(lists, length).to(q.device)


def flex_attention_sparse(q: Tensor, k: Tensor, v: Tensor, index: SparseIndex, scale: float, *,
                          block_mask=None, max_shapes: int = MAX_SHAPES) -> Tensor:
    """Sparse prefill attention over ``index`` with the process's compiled ``flex_attention``.

    q: [B, H, N, D]; k, v: [B, Hkv, N, D] (GQA when Hkv < H); ``index`` for N (batch 1
    broadcasts); ``block_mask``: :func:`flex_mask` of it, if already built. On CPU computes in
    fp32, on inputs padded to :func:`flex_length` rows. Returns [B, H, N, D] in q's dtype.
    """
    import torch._dynamo

    h, n = q.shape[1], q.shape[2]
    length = flex_length(n, index.block_size)
    dtype = torch.float32 if q.device.type == "cpu" else q.dtype

    def rows(x: Tensor) -> Tensor:
        x = x.to(dtype)
        return x.contiguous() if length == n else F.pad(x, (0, 0, 0, length - n))

    mask = flex_mask(index, q) if block_mask is None else block_mask
    with torch._dynamo.config.patch(recompile_limit=max_shapes, fail_on_recompile_limit_hit=True):
        try:
            out = compiled_flex_attention()(rows(q), rows(k), rows(v), block_mask=mask, scale=scale,
                                            enable_gqa=h != k.shape[1])
        except torch._dynamo.exc.FailOnRecompileLimitHit as exc:
            raise RecompileLimit(f"flex_attention has been compiled for {max_shapes} shapes in this process; "
                                 "use the torch backend for more prompt lengths") from exc
    return out[:, :, :n].to(q.dtype)


__all__ = ["MAX_SHAPES", "RecompileLimit", "compiled_flex_attention", "flex_attention_sparse", "flex_available",
           "flex_length", "flex_mask", "pad_index"]
