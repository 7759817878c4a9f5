"""Triton jit code of the sparse prefill kernel; imported only by ``triton_sparse._kernel()``.

Kept in its own module because triton must not be imported when the package is (and
``TRITON_INTERPRET=1`` must be set before it is); the interpreter resolves helper calls
through module globals, so the jit functions live at module level here. Read
``triton_sparse`` for the algorithm, the launcher and the public function.
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    # DOT_FP32: the interpreter (triton 3.9) multiplies bf16 tiles as raw uint16; upcast there
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=INPUT_PRECISION)


@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, k, v, valid, qk_scale,
                         INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    # q [M, D], k [D, N], v [N, D], valid [M, N]; base-2 online softmax
    qk = _dot(q, k, INPUT_PRECISION, DOT_FP32) * qk_scale
    qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, INPUT_PRECISION, DOT_FP32)
    return acc, m_new, l_i


@triton.jit
def _sparse_prefill_kernel(
    Q, K, V, Out,
    BlockCount, BlockOffset, ColumnCount, ColumnIndex,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_oz, stride_oh, stride_om, stride_od,
    stride_bcz, stride_bch, stride_bcm,
    stride_boz, stride_boh, stride_bom, stride_bon,
    stride_ccz, stride_cch, stride_ccm,
    stride_ciz, stride_cih, stride_cim, stride_cin,
    H, N_CTX, HEAD_DIM, GROUP, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_zh = tl.program_id(1)
    off_z = off_zh // H
    off_h = off_zh % H
    off_kvh = off_h // GROUP

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_CTX
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + off_z * stride_kz + off_kvh * stride_kh
    v_base = V + off_z * stride_vz + off_kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # 1) listed key windows
    n_blocks = tl.load(BlockCount + off_z * stride_bcz + off_h * stride_bch + start_m * stride_bcm)
    bo_ptr = BlockOffset + off_z * stride_boz + off_h * stride_boh + start_m * stride_bom
    for j in range(0, n_blocks):
        start_n = tl.load(bo_ptr + j * stride_bon)
        cols = start_n + offs_n
        n_ok = (cols >= 0) & (cols < N_CTX)
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        valid = n_ok[None, :] & (cols[None, :] <= offs_m[:, None])
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, valid, qk_scale, INPUT_PRECISION, DOT_FP32)

    # 2) extra key columns, BLOCK_N at a time
    n_cols = tl.load(ColumnCount + off_z * stride_ccz + off_h * stride_cch + start_m * stride_ccm)
    ci_ptr = ColumnIndex + off_z * stride_ciz + off_h * stride_cih + start_m * stride_cim
    for start_c in range(0, n_cols, BLOCK_N):
        c_ok = start_c + offs_n < n_cols
        cols = tl.load(ci_ptr + (start_c + offs_n) * stride_cin, mask=c_ok, other=0)
        n_ok = c_ok & (cols >= 0) & (cols < N_CTX)
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        valid = n_ok[None, :] & (cols[None, :] <= offs_m[:, None])
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, valid, qk_scale, INPUT_PRECISION, DOT_FP32)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    o_ptrs = Out + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
