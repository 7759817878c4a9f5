"""One entry point for sparse prefill attention: picks the Triton kernel or the CPU path.

``backend``:
- ``"auto"``: Triton when q is on CUDA (and triton imports), the CPU path otherwise;
- ``"triton"``: the Triton kernel; on a CPU tensor only under ``TRITON_INTERPRET=1``
  (the interpreter: for tests, very slow);
- ``"torch"``: the CPU path (``vlsparse.kernels.cpu``) on CPU tensors; on other devices the
  dense-mask reference (``vlsparse.kernels.reference``);
- ``"flex"``: compiled ``flex_attention`` with the lists as a ``BlockMask``
  (``vlsparse.kernels.flex``; compiled once per process and input shape, the first compile
  takes 10-40 s on CPU).

``auto`` does not pick ``flex`` yet: :func:`flex_rule` is the rule it would follow, off while
``AUTO_USES_FLEX_RULE`` is False (issue #19: to be switched on once ``vlsparse bench attention
--flex`` has measured both engines, idle and with ``--load``).
"""

from __future__ import annotations

import os

from torch import Tensor

from vlsparse.kernels.indices import SparseIndex

BACKENDS = ("auto", "triton", "torch", "flex")
AUTO_USES_FLEX_RULE = False
FLEX_MIN_TOKENS = 8192


def flex_rule(q: Tensor, lists: SparseIndex | None = None, min_tokens: int = FLEX_MIN_TOKENS) -> bool:
    """Whether ``auto`` should run ``flex`` (used only when ``AUTO_USES_FLEX_RULE``): CPU tensors, a
    torch with flex_attention, and a prefill of at least ``min_tokens`` tokens, where the compile (once
    per length) pays off. ``lists`` is there for a rule by pattern structure; this one does not read
    it. Unmeasured: check it against ``bench attention --flex`` (idle and ``--load 2``) first."""
    from vlsparse.kernels.flex import flex_available

    return q.device.type == "cpu" and q.shape[2] >= min_tokens and flex_available()


def choose_backend(q: Tensor, backend: str = "auto", lists: SparseIndex | None = None) -> str:
    """The backend that will run: ``"triton"``, ``"cpu"``, ``"flex"`` or ``"reference"``."""
    from vlsparse.kernels.triton_sparse import triton_available

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "triton":
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":  # checked first: importing triton
            raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
        if not triton_available():
            raise RuntimeError("backend 'triton' needs the triton package")
        return "triton"
    if backend == "flex":
        from vlsparse.kernels.flex import flex_available

        if not flex_available():
            raise RuntimeError("backend 'flex' needs torch.nn.attention.flex_attention (torch 2.5 or later)")
        return "flex"
    if backend == "auto" and AUTO_USES_FLEX_RULE and flex_rule(q, lists):
        return "flex"
    if backend == "auto" and q.is_cuda and triton_available():
        return "triton"
    return "cpu" if q.device.type == "cpu" else "reference"


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, lists: SparseIndex, scale: float,
                     backend: str = "auto") -> Tensor:
    """Sparse prefill attention over ``lists``.

    q: [B, H, N, D] (post-RoPE); k, v: [B, Hkv, N, D]; returns [B, H, N, D] in q's dtype,
    equal (up to float error) to softmax attention restricted to the listed keys, causal.
    """
    chosen = choose_backend(q, backend, lists)
    if chosen == "triton":
        from vlsparse.kernels.triton_sparse import sparse_prefill_attention

        idx = lists.to(q.device).expand(q.shape[0])
        return sparse_prefill_attention(q, k, v, idx.block_count, idx.block_offset, idx.column_count,
                                        idx.column_index, scale, idx.block_size)
    if chosen == "flex":
        from vlsparse.kernels.flex import flex_attention_sparse

        return flex_attention_sparse(q, k, v, lists, scale)
    if chosen == "cpu":
        from vlsparse.kernels.cpu import sparse_attention_cpu

        return sparse_attention_cpu(q, k, v, lists, scale)
    from vlsparse.kernels.reference import sparse_attention_reference

    return sparse_attention_reference(q, k, v, lists.to(q.device), scale)


__all__ = ["AUTO_USES_FLEX_RULE", "BACKENDS", "FLEX_MIN_TOKENS", "choose_backend", "flex_rule", "sparse_attention"]
