"""Triton kernels of the MoE layer: a scatter-style grouped GEMM, its weight gradient, and the first
projection with the activation fused into its epilogue (``glu_gemm_kernel``) with its backward.

Imported only when Triton is installed (``moec.backends.triton`` checks). Shape legend:
M routed rows (sorted by expert), T tokens, K input width, N output width, E experts.

``grouped_gemm``: ``out[m, :] = A[src(m), :] @ B[e(m)]`` with ``B[e]`` read through strides
as [K, N] (so the same kernel serves ``x @ w[e].T`` forward and ``grad @ w[e]`` backward).
``src(m)`` is ``order[m] // top_k`` when the kernel gathers token rows itself (ScatterMoE's
idea: no permuted copy of the tokens is materialised), else ``m``. Rows past the last
offset (capacity drops sorted last) are not computed. Tiles never straddle two experts:
program p finds its expert by counting the per-expert tile prefix sums at or below p, so
the grid is fixed on the host (cdiv(M, BM) + E tiles) and nothing waits on the device.

``weight_grad``: ``dW[e] = G[rows of e].T @ A[src(rows of e)]`` as [N, K], one program per
(expert, N tile, K tile), looping over that expert's rows in BM chunks; an empty expert
writes zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moec.moe import activations

# The epilogue codes (constexpr globals: a jitted function may read only those), named in moec.moe.activations.
SILU = tl.constexpr(activations.EPILOGUE_SILU)
GELU = tl.constexpr(activations.EPILOGUE_GELU)
CLAMPED = tl.constexpr(activations.EPILOGUE_CLAMPED)


@triton.jit
def _expert_of_tile(pid, counts_ptr, E, BLOCK_E: tl.constexpr, BM: tl.constexpr):
    """(expert, first row of this tile, end row of the expert) for tile ``pid``; expert == E: no work."""
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    tiles = (counts + BM - 1) // BM
    tile_end = tl.cumsum(tiles, 0)
    row_end = tl.cumsum(counts, 0)
    expert = tl.sum((tile_end <= pid).to(tl.int32), 0)
    mine = experts == expert
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
    expert_end = tl.sum(tl.where(mine, row_end, 0), 0)
    expert_start = tl.sum(tl.where(mine, row_end - counts, 0), 0)
    return expert, expert_start + (pid - first_tile) * BM, expert_end


@triton.jit
def _source_rows(order_ptr, rows, row_ok, TOP_K: tl.constexpr, GATHER: tl.constexpr):
    """The token row each grouped row reads: through ``order`` when routed rows are gathered in the kernel
    (row r of the grouped order is choice ``order[r]``, token ``order[r] // TOP_K``), else the row itself."""
    if GATHER:
        src = tl.load(order_ptr + rows, mask=row_ok, other=0) // TOP_K
    else:
        src = rows
    return src


@triton.jit
def _tile(counts_ptr, order_ptr, E, N, TOP_K: tl.constexpr, GATHER: tl.constexpr, BLOCK_E: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr):
    """This program's tile of a grouped GEMM over (grouped rows, output columns): its expert (E: no work), its
    rows and their token rows (``_source_rows``), its columns, with their in-range masks."""
    expert, row_start, row_end = _expert_of_tile(tl.program_id(0), counts_ptr, E, BLOCK_E, BM)
    rows = row_start + tl.arange(0, BM)
    row_ok = rows < row_end  # all false for expert E (its row range is empty)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    return expert, rows, row_ok, _source_rows(order_ptr, rows, row_ok, TOP_K, GATHER), cols, cols < N


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. UPCAST (Triton's interpreter only): bf16 operands as fp32, since the
    interpreter's bf16 dot returns garbage (triton 3.9); the products are exact either way."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def grouped_gemm_kernel(a_ptr, b_ptr, bias_ptr, out_ptr, counts_ptr, order_ptr, E, K, N, stride_am, stride_ak, stride_be,
                        stride_bk, stride_bn, stride_om, stride_on, TOP_K: tl.constexpr, GATHER: tl.constexpr,
                        HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr):
    expert, rows, row_ok, src, cols, col_ok = _tile(counts_ptr, order_ptr, E, N, TOP_K, GATHER, BLOCK_E, BM, BN)
    if expert < E:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < K
            a = tl.load(a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptr + expert * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, PRECISION, UPCAST)
        if HAS_BIAS:  # the tile's one expert: its bias row [E, N]
            acc += tl.load(bias_ptr + expert * N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def weight_grad_kernel(g_ptr, a_ptr, dw_ptr, counts_ptr, order_ptr, E, K, N, stride_gm, stride_gn, stride_am, stride_ak,
                       stride_we, stride_wn, stride_wk, TOP_K: tl.constexpr, GATHER: tl.constexpr, BLOCK_E: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    expert = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    ends = tl.cumsum(counts, 0)
    end = tl.sum(tl.where(experts == expert, ends, 0), 0)
    start = end - tl.sum(tl.where(experts == expert, counts, 0), 0)
    ns = pid_n * BN + tl.arange(0, BN)
    ks = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(start, end, BM):
        rows = m0 + tl.arange(0, BM)
        row_ok = rows < end
        src = _source_rows(order_ptr, rows, row_ok, TOP_K, GATHER)
        g = tl.load(g_ptr + rows[None, :] * stride_gm + ns[:, None] * stride_gn, mask=row_ok[None, :] & (ns[:, None] < N), other=0.0)
        a = tl.load(a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak, mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)
        acc = _dot(g, a, acc, PRECISION, UPCAST)
    dw = dw_ptr + expert * stride_we + ns[:, None] * stride_wn + ks[None, :] * stride_wk
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=(ns[:, None] < N) & (ks[None, :] < K))


@triton.jit
def _activate(v, ACTIVATION: tl.constexpr):
    """``F.<ACTIVATION>(v)`` in fp32 (gelu: the exact erf form, torch's default)."""
    if ACTIVATION == SILU:
        return v * tl.sigmoid(v)
    elif ACTIVATION == GELU:
        return 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    else:
        return tl.maximum(v, 0.0)


@triton.jit
def _activate_grad(v, ACTIVATION: tl.constexpr):
    """d F.<ACTIVATION>(v) / dv (relu: 0 at 0, as torch)."""
    if ACTIVATION == SILU:
        s = tl.sigmoid(v)
        return s * (1.0 + v * (1.0 - s))
    elif ACTIVATION == GELU:
        return 0.5 * (1.0 + tl.erf(v * 0.7071067811865476)) + v * 0.3989422804014327 * tl.exp(-0.5 * v * v)
    else:
        return (v > 0.0).to(tl.float32)


@triton.jit
def _clamped_glu(gate, up, limit, alpha):
    """GPT-OSS's clamped SwiGLU (ACTIVATION CLAMPED): (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g), g = min(gate, l)."""
    g = tl.minimum(gate, limit)
    return (tl.minimum(tl.maximum(up, -limit), limit) + 1.0) * g * tl.sigmoid(alpha * g)


@triton.jit
def _clamped_glu_grads(grad, gate, up, limit, alpha):
    """(d/d up, d/d gate) of ``_clamped_glu`` times ``grad``; a clamp passes the gradient inside its closed range, as torch's."""
    g = tl.minimum(gate, limit)
    s = tl.sigmoid(alpha * g)
    grad_up = tl.where((up >= -limit) & (up <= limit), grad * g * s, 0.0)
    grad_gate = tl.where(gate <= limit, grad * (tl.minimum(tl.maximum(up, -limit), limit) + 1.0) * (s + g * alpha * s * (1.0 - s)), 0.0)
    return grad_up, grad_gate


@triton.jit
def glu_gemm_kernel(a_ptr, w_ptr, bias_ptr, h_ptr, pre_ptr, counts_ptr, order_ptr, E, K, N, stride_am, stride_ak, stride_we, stride_wk,
                    stride_wn, up_weight, stride_bias_e, up_bias, stride_hm, stride_hn, stride_pm, up_pre, limit, alpha,
                    TOP_K: tl.constexpr, GATHER: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ACTIVATION: tl.constexpr, SAVE: tl.constexpr, BLOCK_E: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The first expert projection with its activation as epilogue: ``h = act(A @ Wgate) * (A @ Wup)``
    (``GATED``; both accumulated from the same A tile; ACTIVATION CLAMPED: ``_clamped_glu`` with
    ``limit`` and ``alpha``) or ``h = act(A @ Wup)``. Tiles and the row gather as ``grouped_gemm_kernel``.

    A gated weight is one [E, 2, N, K] tensor, gate half first: the up half starts ``up_weight``
    elements after the gate half (the bias's ``up_bias`` after its gate half; 0 when not gated).
    ``SAVE`` stores the pre-activations for backward in rows of ``stride_pm``: gate at 0, up at ``up_pre``."""
    expert, rows, row_ok, src, cols, col_ok = _tile(counts_ptr, order_ptr, E, N, TOP_K, GATHER, BLOCK_E, BM, BN)
    if expert < E:
        up = tl.zeros((BM, BN), dtype=tl.float32)
        gate = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < K
            a = tl.load(a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b_off = expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
            b_ok = k_ok[:, None] & col_ok[None, :]
            up = _dot(a, tl.load(w_ptr + up_weight + b_off, mask=b_ok, other=0.0), up, PRECISION, UPCAST)
            if GATED:
                gate = _dot(a, tl.load(w_ptr + b_off, mask=b_ok, other=0.0), gate, PRECISION, UPCAST)
        if HAS_BIAS:
            bias_row = bias_ptr + expert * stride_bias_e + cols
            up += tl.load(bias_row + up_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                gate += tl.load(bias_row, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        # round the pre-activations to the output dtype first, as the unfused GEMM + activation would
        up = up.to(h_ptr.dtype.element_ty).to(tl.float32)
        if GATED:
            gate = gate.to(h_ptr.dtype.element_ty).to(tl.float32)
            if ACTIVATION == CLAMPED:
                h = _clamped_glu(gate, up, limit, alpha)
            else:
                h = _activate(gate, ACTIVATION) * up
        else:
            h = _activate(up, ACTIVATION)
        ok = row_ok[:, None] & col_ok[None, :]
        tl.store(h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hn, h.to(h_ptr.dtype.element_ty), mask=ok)
        if SAVE:
            pre = pre_ptr + rows[:, None] * stride_pm + cols[None, :]
            tl.store(pre + up_pre, up.to(h_ptr.dtype.element_ty), mask=ok)
            if GATED:
                tl.store(pre, gate.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def glu_backward_kernel(grad_ptr, pre_ptr, grad_pre_ptr, numel, N, stride_pm, up_pre, limit, alpha, GATED: tl.constexpr,
                        ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    """Elementwise over the gradient of ``h`` (contiguous [M, N]): the gradients of the pre-activations, in their
    layout (rows of ``stride_pm``: gate at 0, up at ``up_pre``), so one GEMM takes both halves back."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < numel
    pre_offsets = (offsets // N) * stride_pm + offsets % N
    grad = tl.load(grad_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(pre_ptr + pre_offsets + up_pre, mask=ok, other=0.0).to(tl.float32)
    if GATED:
        gate = tl.load(pre_ptr + pre_offsets, mask=ok, other=0.0).to(tl.float32)
        if ACTIVATION == CLAMPED:
            grad_up, grad_gate = _clamped_glu_grads(grad, gate, up, limit, alpha)
        else:
            grad_up, grad_gate = grad * _activate(gate, ACTIVATION), grad * up * _activate_grad(gate, ACTIVATION)
        tl.store(grad_pre_ptr + pre_offsets + up_pre, grad_up.to(grad_pre_ptr.dtype.element_ty), mask=ok)
        tl.store(grad_pre_ptr + pre_offsets, grad_gate.to(grad_pre_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(grad_pre_ptr + pre_offsets, (grad * _activate_grad(up, ACTIVATION)).to(grad_pre_ptr.dtype.element_ty), mask=ok)


@triton.jit
def bias_grad_kernel(g_ptr, db_ptr, counts_ptr, E, N, stride_gm, stride_gn, BLOCK_E: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr):
    """``db[e] = sum of G's rows of expert e`` (fp32, rows in order: deterministic), one program per (expert, N tile)."""
    expert = tl.program_id(0)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    ends = tl.cumsum(counts, 0)
    end = tl.sum(tl.where(experts == expert, ends, 0), 0)
    start = end - tl.sum(tl.where(experts == expert, counts, 0), 0)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for m0 in range(start, end, BM):
        rows = m0 + tl.arange(0, BM)
        ok = (rows < end)[:, None] & (cols < N)[None, :]
        acc += tl.sum(tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=ok, other=0.0).to(tl.float32), 0)
    tl.store(db_ptr + expert * N + cols, acc, mask=cols < N)
