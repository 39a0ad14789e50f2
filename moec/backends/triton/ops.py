"""The Triton grouped GEMM as a torch custom op with its own backward (opaque to torch.compile).

``moec::triton_grouped_linear(x, w, counts, order, top_k, tiles)`` -> [M, N]:
row m is ``x[src(m)] @ w[e(m)].T`` with ``w`` [E, N, K] in the parameters' layout, rows
grouped by expert with ``counts[e]`` rows each (rows past ``sum(counts)``: zeros, e.g.
choices dropped by capacity and sorted last). ``src(m) = order[m] // top_k`` when ``order``
is given (the kernel gathers token rows: no permuted copy), else ``m``.

Backward: the row gradients come from the same kernel reading ``w[e]`` untransposed; with a
gather they go back to tokens by writing each row to its (token, choice) slot and summing
the ``top_k`` slots in order (deterministic, no atomics). The weight gradient comes from
``weight_grad_kernel`` in the weight's layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moec.backends.triton.tiles import Tile, tile_for


def launch_grouped_gemm(a: Tensor, w_kn: tuple, counts: Tensor, order: Tensor | None, top_k: int, rows: int, n: int,
                    tile: Tile) -> Tensor:
    """out[m] = a[src(m)] @ B[e(m)], with B[e] read as [K, N] through (tensor, stride_e, stride_k, stride_n)."""
    import triton

    from moec.backends.triton.kernels import grouped_gemm_kernel

    b, stride_be, stride_bk, stride_bn = w_kn
    experts, width = counts.shape[0], a.shape[1]
    out = a.new_zeros(rows, n)
    grid = (triton.cdiv(rows, tile.BM) + experts, triton.cdiv(n, tile.BN))
    grouped_gemm_kernel[grid](
        a, b, out, counts, order if order is not None else counts, experts, width, n, a.stride(0), a.stride(1),
        stride_be, stride_bk, stride_bn, out.stride(0), out.stride(1), TOP_K=top_k, GATHER=order is not None,
        BLOCK_E=experts_block(experts), BM=tile.BM, BN=tile.BN, BK=tile.BK, PRECISION=precision_of(a), UPCAST=a.device.type == "cpu",
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


def experts_block(experts: int) -> int:
    return max(16, 1 << (experts - 1).bit_length())


def precision_of(a: Tensor) -> str:
    """fp32 GEMMs in IEEE fp32 unless torch allows TF32 (``torch.backends.cuda.matmul.allow_tf32``)."""
    return "tf32" if a.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def rows_to_tokens(grad_rows: Tensor, order: Tensor | None, tokens: int, top_k: int) -> Tensor:
    """The gradient of gathered token rows back to the tokens: each row to its (token, choice) slot,
    then the choices summed in order (deterministic, no atomics). Without a gather: unchanged."""
    if order is None:
        return grad_rows
    slots = torch.empty_like(grad_rows).index_copy(0, order, grad_rows)
    return slots.view(tokens, top_k, -1).sum(1)


def routed_rows(x: Tensor, order: Tensor | None) -> int:
    return order.shape[0] if order is not None else x.shape[0]


@torch.library.custom_op("moec::triton_grouped_linear", mutates_args=())
def _grouped_linear(x: Tensor, w: Tensor, counts: Tensor, order: Tensor | None, top_k: int, tiles: list[int]) -> Tensor:
    tile = tile_for(x, w, routed_rows(x, order), tiles)
    return launch_grouped_gemm(x, (w, w.stride(0), w.stride(2), w.stride(1)), counts, order, top_k, routed_rows(x, order), w.shape[1], tile)


@_grouped_linear.register_fake
def _(x: Tensor, w: Tensor, counts: Tensor, order: Tensor | None, top_k: int, tiles: list[int]) -> Tensor:
    return x.new_empty(routed_rows(x, order), w.shape[1])


@torch.library.custom_op("moec::triton_grouped_linear_backward", mutates_args=())
def _grouped_linear_backward(grad: Tensor, x: Tensor, w: Tensor, counts: Tensor, order: Tensor | None, top_k: int,
                             tiles: list[int]) -> tuple[Tensor, Tensor]:
    tile = tile_for(x, w, grad.shape[0], tiles)
    grad_rows = launch_grouped_gemm(grad, (w, w.stride(0), w.stride(1), w.stride(2)), counts, None, 1, grad.shape[0], w.shape[2], tile)
    grad_x = rows_to_tokens(grad_rows, order, x.shape[0], top_k)
    grad_w = launch_weight_grad(grad, x, counts, order, top_k, w.shape, tile)
    return grad_x, grad_w


@_grouped_linear_backward.register_fake
def _(grad: Tensor, x: Tensor, w: Tensor, counts: Tensor, order: Tensor | None, top_k: int,
      tiles: list[int]) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), w.new_empty(w.shape)


def _setup(ctx, inputs, output) -> None:
    x, w, counts, order, top_k, tiles = inputs
    ctx.save_for_backward(x, w, counts, order)
    ctx.top_k, ctx.tiles = top_k, tiles


def _backward(ctx, grad: Tensor):
    x, w, counts, order = ctx.saved_tensors
    grad_x, grad_w = _grouped_linear_backward(grad.contiguous(), x, w, counts, order, ctx.top_k, ctx.tiles)
    return grad_x, grad_w, None, None, None, None


_grouped_linear.register_autograd(_backward, setup_context=_setup)


def grouped_linear(x: Tensor, w: Tensor, counts: Tensor, order: Tensor | None = None, top_k: int = 1,
                   tiles: tuple[int, ...] | None = None) -> Tensor:
    """``F.linear`` per expert group of rows; ``counts`` (E,) int32, the rows of each group."""
    return _grouped_linear(x.contiguous(), w.contiguous(), counts, order, top_k, list(tiles or ()))
