"""Launching the grouped-GEMM kernels (moec.backends.triton.kernels) with a tile: the forward rows,
the weight gradient and the bias gradient. The custom ops (ops.py, glu.py) call them, and so does
the tile autotuner (tiles.py) to time each candidate."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tile:
    BM: int
    BN: int
    BK: int
    warps: int
    stages: int


def launch_grouped_gemm(a: Tensor, w_kn: tuple, counts: Tensor, order: Tensor | None, top_k: int, rows: int, n: int,
                        tile: Tile, bias: Tensor | None = None) -> Tensor:
    """out[m] = a[src(m)] @ B[e(m)] (+ bias[e(m)]), with B[e] read as [K, N] through (tensor, stride_e, stride_k, stride_n)."""
    import triton

    from moec.backends.triton.kernels import grouped_gemm_kernel

    b, stride_be, stride_bk, stride_bn = w_kn
    experts, width = counts.shape[0], a.shape[1]
    out = a.new_zeros(rows, n)
    grid = (triton.cdiv(rows, tile.BM) + experts, triton.cdiv(n, tile.BN))
    grouped_gemm_kernel[grid](
        a, b, bias if bias is not None else b, out, counts, order if order is not None else counts, experts, width, n,
        a.stride(0), a.stride(1), stride_be, stride_bk, stride_bn, out.stride(0), out.stride(1), TOP_K=top_k,
        GATHER=order is not None, HAS_BIAS=bias is not None, BLOCK_E=experts_block(experts), BM=tile.BM, BN=tile.BN, BK=tile.BK, PRECISION=precision_of(a), UPCAST=a.device.type == "cpu",
        num_warps=tile.warps, num_stages=tile.stages)
    return out


def launch_weight_grad(grad: Tensor, a: Tensor, counts: Tensor, order: Tensor | None, top_k: int, w_shape, tile: Tile) -> Tensor:
    import triton

    from moec.backends.triton.kernels import weight_grad_kernel

    experts, n, k = w_shape
    dw = grad.new_empty(experts, n, k)
    grid = (experts, triton.cdiv(n, tile.BN), triton.cdiv(k, tile.BK))
    weight_grad_kernel[grid](
        grad, a, dw, counts, order if order is not None else counts, experts, k, n, grad.stride(0), grad.stride(1),
        a.stride(0), a.stride(1), dw.stride(0), dw.stride(1), dw.stride(2), TOP_K=top_k, GATHER=order is not None,
        BLOCK_E=experts_block(experts), BM=tile.BM, BN=tile.BN, BK=tile.BK, PRECISION=precision_of(a), UPCAST=a.device.type == "cpu",
        num_warps=tile.warps, num_stages=tile.stages)
    return dw


def launch_bias_grad(grad: Tensor, counts: Tensor, dtype: torch.dtype, tile: Tile) -> Tensor:
    """Each expert's bias gradient [E, N]: the sum of its rows of ``grad`` (rows past the groups: none)."""
    import triton

    from moec.backends.triton.kernels import bias_grad_kernel

    experts, n = counts.shape[0], grad.shape[1]
    db = torch.empty(experts, n, dtype=torch.float32, device=grad.device)
    bias_grad_kernel[(experts, triton.cdiv(n, tile.BN))](grad, db, counts, experts, n, grad.stride(0), grad.stride(1),
                                                         BLOCK_E=experts_block(experts), BM=tile.BM, BN=tile.BN)
    return db.to(dtype)


def experts_block(experts: int) -> int:
    return max(16, 1 << (experts - 1).bit_length())


def precision_of(a: Tensor) -> str:
    """fp32 GEMMs in IEEE fp32 unless torch allows TF32 (``torch.backends.cuda.matmul.allow_tf32``)."""
    return "tf32" if a.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
