"""The Triton grouped GEMM as a torch custom op with its own backward (opaque to torch.compile).

``moec::triton_grouped_linear(x, w, bias, counts, order, top_k, tiles)`` -> [M, N]:
row m is ``x[src(m)] @ w[e(m)].T (+ bias[e(m)])`` with ``w`` [E, N, K] in the parameters'
layout and ``bias`` [E, N] or None, rows grouped by expert with ``counts[e]`` rows each (rows
past ``sum(counts)``: zeros, e.g. choices dropped by capacity and sorted last).
``src(m) = order[m] // top_k`` when ``order`` is given (the kernel gathers token rows: no
permuted copy), else ``m``.

Backward: the row gradients come from the same kernel reading ``w[e]`` untransposed; with a
gather they go back to tokens by writing each row to its (token, choice) slot and summing
the ``top_k`` slots in order (deterministic, no atomics). The weight gradient comes from
``weight_grad_kernel`` in the weight's layout, the bias gradient from ``bias_grad_kernel``
(each expert's rows summed in order)."""

from __future__ import annotations

import torch
from torch import Tensor

from moec.backends.triton.launch import launch_bias_grad, launch_grouped_gemm, launch_weight_grad
from moec.backends.triton.tiles import tile_for


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
def _grouped_linear(x: Tensor, w: Tensor, bias: Tensor | None, counts: Tensor, order: Tensor | None, top_k: int,
                    tiles: list[int]) -> Tensor:
    tile = tile_for(x, w, routed_rows(x, order), tiles)
    return launch_grouped_gemm(x, (w, w.stride(0), w.stride(2), w.stride(1)), counts, order, top_k, routed_rows(x, order), w.shape[1], tile,
                               bias)


@_grouped_linear.register_fake
def _(x: Tensor, w: Tensor, bias: Tensor | None, counts: Tensor, order: Tensor | None, top_k: int, tiles: list[int]) -> Tensor:
    return x.new_empty(routed_rows(x, order), w.shape[1])


@torch.library.custom_op("moec::triton_grouped_linear_backward", mutates_args=())
def _grouped_linear_backward(grad: Tensor, x: Tensor, w: Tensor, has_bias: bool, counts: Tensor, order: Tensor | None, top_k: int,
                             tiles: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    tile = tile_for(x, w, grad.shape[0], tiles)
    grad_rows = launch_grouped_gemm(grad, (w, w.stride(0), w.stride(1), w.stride(2)), counts, None, 1, grad.shape[0], w.shape[2], tile)
    grad_x = rows_to_tokens(grad_rows, order, x.shape[0], top_k)
    grad_w = launch_weight_grad(grad, x, counts, order, top_k, w.shape, tile)
    grad_b = launch_bias_grad(grad, counts, w.dtype, tile) if has_bias else w.new_empty(0)
    return grad_x, grad_w, grad_b


@_grouped_linear_backward.register_fake
def _(grad: Tensor, x: Tensor, w: Tensor, has_bias: bool, counts: Tensor, order: Tensor | None, top_k: int,
      tiles: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(x), w.new_empty(w.shape), w.new_empty(w.shape[:2] if has_bias else (0,))


def _setup(ctx, inputs, output) -> None:
    x, w, bias, counts, order, top_k, tiles = inputs
    ctx.save_for_backward(x, w, counts, order)
    ctx.top_k, ctx.tiles, ctx.has_bias = top_k, tiles, bias is not None


def _backward(ctx, grad: Tensor):
    x, w, counts, order = ctx.saved_tensors
    grad_x, grad_w, grad_b = _grouped_linear_backward(grad.contiguous(), x, w, ctx.has_bias, counts, order, ctx.top_k, ctx.tiles)
    return grad_x, grad_w, grad_b if ctx.has_bias else None, None, None, None, None


_grouped_linear.register_autograd(_backward, setup_context=_setup)


def grouped_linear(x: Tensor, w: Tensor, counts: Tensor, order: Tensor | None = None, top_k: int = 1,
                   tiles: tuple[int, ...] | None = None, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` per expert group of rows (+ the row's expert's ``bias`` [E, N]); ``counts`` (E,) int32, the rows of each group."""
    bias = bias.contiguous() if bias is not None else None
    return _grouped_linear(x.contiguous(), w.contiguous(), bias, counts, order, top_k, list(tiles or ()))
