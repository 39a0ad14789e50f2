"""The fused router, the sort-free permutation and the weighted combine as torch custom ops
(kernels in ``routing_kernels.py``; opaque to torch.compile, no host sync).

- ``route(logits, top_k, sigmoid, temperature, normalize, bias)`` -> ``(scores, weights, chosen,
  block_counts)``: the ``topk`` (softmax) and ``sigmoid_bias`` routers in one kernel. Backward
  is one kernel too: the weights' gradient goes back through the renormalisation into the
  chosen columns of the scores' gradient, then through softmax or sigmoid to the logits (the
  selection bias and the top-k choice carry no gradient, as in the reference).
- ``permute(group, groups, block_counts, block_rows)`` -> ``(dest, order, totals)``: the rows
  sorted by group in the stable order of ``argsort(group, stable=True)`` from counts and
  prefix sums; ``order[dest[r]] = r``.
- ``combine(y_sorted, weights, dest)`` -> ``(T, D)``: each token's k rows times their weights,
  summed in choice order; backward to the rows and to the weights by one kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

ONE_HOT_BUDGET = 16384  # elements of a block's one-hot [rows, groups] tile (registers on a GPU)
COMBINE_COLUMNS = 128


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def router_block(top_k: int, experts: int, tiles: tuple[int, ...] | list[int] = ()) -> int:
    """Tokens per router program: ``schedule.tiles``' BM when given, else 64; halved until the permutation's
    one-hot block (tokens * top_k rows by experts, powers of two) fits ``ONE_HOT_BUDGET``."""
    block = tiles[0] if tiles else 64
    while block > 1 and _pow2(block * top_k) * _pow2(experts) > ONE_HOT_BUDGET:
        block //= 2
    return block


@torch.library.custom_op("moec::triton_route", mutates_args=())
def _route(logits: Tensor, bias: Tensor | None, top_k: int, sigmoid: bool, temperature: float, normalize: bool,
           block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    import triton

    from moec.backends.triton.routing_kernels import router_kernel

    tokens, experts = logits.shape
    blocks = triton.cdiv(tokens, block)
    scores = torch.empty_like(logits)
    weights = logits.new_empty(tokens, top_k)
    chosen = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    block_counts = torch.empty(blocks, experts, dtype=torch.int32, device=logits.device)
    router_kernel[(blocks,)](
        logits, bias if bias is not None else logits, scores, weights, chosen, block_counts, tokens, experts, temperature,
        K=top_k, SIGMOID=sigmoid, HAS_BIAS=bias is not None, NORMALIZE=normalize, BT=block, BLOCK_E=_pow2(experts),
        BLOCK_K=_pow2(top_k))
    return scores, weights, chosen, block_counts


@_route.register_fake
def _(logits, bias, top_k, sigmoid, temperature, normalize, block):
    tokens, experts = logits.shape
    blocks = (tokens + block - 1) // block
    return (torch.empty_like(logits), logits.new_empty(tokens, top_k),
            logits.new_empty(tokens, top_k, dtype=torch.int64), logits.new_empty(blocks, experts, dtype=torch.int32))


@torch.library.custom_op("moec::triton_route_backward", mutates_args=())
def _route_backward_op(grad_scores: Tensor | None, grad_weights: Tensor, scores: Tensor, weights: Tensor, chosen: Tensor,
                       sigmoid: bool, temperature: float, normalize: bool, block: int) -> Tensor:
    import triton

    from moec.backends.triton.routing_kernels import router_backward_kernel

    tokens, experts = scores.shape
    grad_logits = torch.empty_like(scores)
    router_backward_kernel[(triton.cdiv(tokens, block),)](
        scores, weights, chosen, grad_scores if grad_scores is not None else scores, grad_weights, grad_logits, tokens, experts,
        temperature, K=weights.shape[1], SIGMOID=sigmoid, NORMALIZE=normalize, HAS_GRAD_SCORES=grad_scores is not None, BT=block,
        BLOCK_E=_pow2(experts))
    return grad_logits


@_route_backward_op.register_fake
def _(grad_scores, grad_weights, scores, weights, chosen, sigmoid, temperature, normalize, block):
    return torch.empty_like(scores)


def _route_setup(ctx, inputs, output) -> None:
    _, _, _, sigmoid, temperature, normalize, block = inputs
    scores, weights, chosen, _ = output
    ctx.save_for_backward(scores, weights, chosen)
    ctx.sigmoid, ctx.temperature, ctx.normalize, ctx.block = sigmoid, temperature, normalize, block


def _route_backward(ctx, grad_scores, grad_weights, _grad_chosen, _grad_counts):
    scores, weights, chosen = ctx.saved_tensors
    grad_weights = grad_weights.contiguous() if grad_weights is not None else torch.zeros_like(weights)
    grad_scores = grad_scores.contiguous() if grad_scores is not None else None
    grad_logits = _route_backward_op(grad_scores, grad_weights, scores, weights, chosen, ctx.sigmoid, ctx.temperature,
                                     ctx.normalize, ctx.block)
    return grad_logits, None, None, None, None, None, None


_route.register_autograd(_route_backward, setup_context=_route_setup)


@torch.library.custom_op("moec::triton_permute", mutates_args=())
def _permute(group: Tensor, groups: int, block_counts: Tensor | None, block_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    import triton

    from moec.backends.triton.routing_kernels import (
        histogram_kernel,
        rank_kernel,
        scan_kernel,
    )

    rows = group.shape[0]
    blocks = triton.cdiv(rows, block_rows)
    shape = {"BR": block_rows, "BLOCK_R": _pow2(block_rows), "BLOCK_G": _pow2(groups)}
    if block_counts is None:
        block_counts = torch.empty(blocks, groups, dtype=torch.int32, device=group.device)
        histogram_kernel[(blocks,)](group, block_counts, rows, groups, **shape)
    before = torch.empty_like(block_counts)
    totals = torch.empty(groups, dtype=torch.int32, device=group.device)
    scan_kernel[(1,)](block_counts, before, totals, blocks, groups, BLOCK_B=64, BLOCK_G=shape["BLOCK_G"])
    dest = torch.empty(rows, dtype=torch.int64, device=group.device)
    order = torch.empty(rows, dtype=torch.int64, device=group.device)
    rank_kernel[(blocks,)](group, before, totals, dest, order, rows, groups, **shape)
    return dest, order, totals


@_permute.register_fake
def _(group, groups, block_counts, block_rows):
    return torch.empty_like(group, dtype=torch.int64), torch.empty_like(group, dtype=torch.int64), group.new_empty(groups, dtype=torch.int32)


@torch.library.custom_op("moec::triton_combine", mutates_args=())
def _combine(y: Tensor, weights: Tensor, dest: Tensor, block: int) -> Tensor:
    import triton

    from moec.backends.triton.routing_kernels import combine_kernel

    tokens, top_k = weights.shape
    out = y.new_empty(tokens, y.shape[1], dtype=torch.promote_types(y.dtype, weights.dtype))
    combine_kernel[(triton.cdiv(tokens, block),)](y, weights, dest, out, tokens, y.shape[1], y.stride(0), out.stride(0),
                                                  K=top_k, BT=block, BD=COMBINE_COLUMNS)
    return out


@_combine.register_fake
def _(y, weights, dest, block):
    return y.new_empty(weights.shape[0], y.shape[1], dtype=torch.promote_types(y.dtype, weights.dtype))


@torch.library.custom_op("moec::triton_combine_backward", mutates_args=())
def _combine_backward(grad: Tensor, y: Tensor, weights: Tensor, dest: Tensor, block: int) -> tuple[Tensor, Tensor]:
    import triton

    from moec.backends.triton.routing_kernels import combine_backward_kernel

    tokens, top_k = weights.shape
    grad_y = torch.empty_like(y)  # every row is some (token, choice)'s: each written once
    grad_w = torch.empty_like(weights)
    combine_backward_kernel[(triton.cdiv(tokens, block),)](grad, y, weights, dest, grad_y, grad_w, tokens, y.shape[1],
                                                           grad.stride(0), y.stride(0), K=top_k, BT=block, BD=COMBINE_COLUMNS)
    return grad_y, grad_w


@_combine_backward.register_fake
def _(grad, y, weights, dest, block):
    return torch.empty_like(y), torch.empty_like(weights)


def _combine_setup(ctx, inputs, output) -> None:
    y, weights, dest, block = inputs
    ctx.save_for_backward(y, weights, dest)
    ctx.block = block


def _combine_backward_formula(ctx, grad):
    y, weights, dest = ctx.saved_tensors
    grad_y, grad_w = _combine_backward(grad.contiguous(), y, weights, dest, ctx.block)
    return grad_y, grad_w, None, None


_combine.register_autograd(_combine_backward_formula, setup_context=_combine_setup)


def route(logits: Tensor, top_k: int, sigmoid: bool, temperature: float, normalize: bool, bias: Tensor | None = None,
          block: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(scores (T, E), weights (T, k), chosen (T, k) int64, block_counts (B, E) int32): the experts' counts in
    each block of ``block`` tokens (default ``router_block``); their column sums are the per-expert counts."""
    if torch.is_autocast_enabled(logits.device.type) and not sigmoid:
        logits = logits.float()  # softmax runs in fp32 under autocast, as torch's
    bias = bias.detach().contiguous() if bias is not None else None
    block = block or router_block(top_k, logits.shape[1])
    return _route(logits.contiguous(), bias, top_k, sigmoid, temperature, normalize, block)


def permute(group: Tensor, groups: int, block_counts: Tensor | None = None, block_rows: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(dest, order, totals) of the rows sorted by ``group`` (values in [0, groups)), stably, without a sort.

    ``block_counts`` (B, groups): the groups' counts per block of ``block_rows`` rows when known (the router's);
    else counted here per block of ``block_rows`` rows (default: a power of two fitting ``ONE_HOT_BUDGET``)."""
    if block_counts is None and not block_rows:
        block_rows = max(1, min(256, ONE_HOT_BUDGET // _pow2(groups)))
    return _permute(group.contiguous(), groups, block_counts, block_rows)


def combine(y_sorted: Tensor, weights: Tensor, dest: Tensor, tiles: tuple[int, ...] = ()) -> Tensor:
    """``out[t] = sum_j weights[t, j] * y_sorted[dest[t * k + j]]``, choices summed in order."""
    return _combine(y_sorted.contiguous(), weights.contiguous(), dest, tiles[0] if tiles else 32)
