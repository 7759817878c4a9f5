"""One entry point for sparse prefill attention: picks the Triton kernel or the CPU path.

``backend``:
- ``"auto"``: Triton when q is on CUDA (and triton imports), the CPU path otherwise;
- ``"triton"``: the Triton kernel; on a CPU tensor only under ``TRITON_INTERPRET=1``
  (the interpreter: for tests, very slow);
- ``"torch"``: the CPU path (``vlsparse.kernels.cpu``) on CPU tensors; on other devices the
  dense-mask reference (``vlsparse.kernels.reference``).
"""

from __future__ import annotations

import os

from torch import Tensor

from vlsparse.kernels.indices import SparseIndex

BACKENDS = ("auto", "triton", "torch")


def choose_backend(q: Tensor, backend: str = "auto") -> str:
    """The backend that will run: ``"triton"``, ``"cpu"`` or ``"reference"``."""
    from vlsparse.kernels.triton_sparse import triton_available

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "triton":
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":  # checked first: importing triton
            raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
        if not triton_available():
            raise RuntimeError("backend 'triton' needs the triton package")
        return "triton"
    if backend == "auto" and q.is_cuda and triton_available():
        return "triton"
    return "cpu" if q.device.type == "cpu" else "reference"


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, lists: SparseIndex, scale: float,
                     backend: str = "auto") -> Tensor:
    """Sparse prefill attention over ``lists``.

    q: [B, H, N, D] (post-RoPE); k, v: [B, Hkv, N, D]; returns [B, H, N, D] in q's dtype,
    equal (up to float error) to softmax attention restricted to the listed keys, causal.
    """
    chosen = choose_backend(q, backend)
    if chosen == "triton":
        from vlsparse.kernels.triton_sparse import sparse_prefill_attention

        idx = lists.to(q.device).expand(q.shape[0])
        return sparse_prefill_attention(q, k, v, idx.block_count, idx.block_offset, idx.column_count,
                                        idx.column_index, scale, idx.block_size)
    if chosen == "cpu":
        from vlsparse.kernels.cpu import sparse_attention_cpu

        return sparse_attention_cpu(q, k, v, lists, scale)
    from vlsparse.kernels.reference import sparse_attention_reference

    return sparse_attention_reference(q, k, v, lists.to(q.device), scale)


__all__ = ["BACKENDS", "choose_backend", "sparse_attention"]
