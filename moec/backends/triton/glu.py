"""The experts' first projection with the activation fused into the GEMM's epilogue, as a torch
custom op with its own backward (opaque to torch.compile).

``moec::triton_grouped_glu(x, w, bias, counts, order, top_k, epilogue, limit, alpha, save, tiles)``
-> (h, pre): for a gated activation (swiglu, geglu, reglu, GPT-OSS's clamped SwiGLU) ``w`` is
``experts.w_gate_up`` [E, 2, H, D] itself, gate half first, read through its strides (no copy
of either half) and ``h[m] = act(x[src(m)] @ w[e, 0].T) * (x[src(m)] @ w[e, 1].T)``, both
products accumulated from one read of the row tile and combined before the store; otherwise
``w`` is [E, H, D] and ``h[m] = act(x[src(m)] @ w[e].T)``. Rows, the gather and the tiles are
those of ``moec::triton_grouped_linear`` (ops.py). ``save`` also returns the pre-activations
``pre`` in the weight's layout ([M, 2, H] gate and up, or [M, H]; else empty), which backward reads.

Backward: ``glu_backward_kernel`` turns the gradient of ``h`` into that of ``pre`` (same
layout); then, as for one [E, 2H, D] weight, a single grouped GEMM gives the row gradients
``grad_pre @ w[e]`` (back to the tokens in choice order), a single ``weight_grad_kernel`` the
gradient of ``w`` in its own layout, and a single ``bias_grad_kernel`` that of the bias.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moec.backends.triton.launch import experts_block, launch_bias_grad, launch_grouped_gemm, launch_weight_grad, precision_of
from moec.backends.triton.ops import routed_rows, rows_to_tokens
from moec.backends.triton.tiles import tile_for
from moec.moe.activations import is_gated, triton_epilogue

ELEMENTWISE_BLOCK = 1024
_STAGES: dict[tuple, int] = {}  # (tile, dtype, gated, device) -> the pipeline stages that fit in shared memory


def _halves(w: Tensor) -> tuple[Tensor, int]:
    """(one [E, H, D] half of the weight, the up half's offset in elements): gated weights are [E, 2, H, D], gate first."""
    return (w[:, 0], w.stride(1)) if w.dim() == 4 else (w, 0)


def _pre_layout(rows: int, w: Tensor) -> tuple[int, ...]:
    """The saved pre-activations' shape: [M, 2, H] (gate, up) for a gated weight, else [M, H]."""
    return (rows, *w.shape[1:3]) if w.dim() == 4 else (rows, w.shape[1])


def _pre_width(w: Tensor) -> int:
    """Elements per row of the pre-activations: 2H gated, else H (explicit: a view of 0 rows cannot infer it)."""
    return w.shape[1] * w.shape[2] if w.dim() == 4 else w.shape[1]


@torch.library.custom_op("moec::triton_grouped_glu", mutates_args=())
def _grouped_glu(x: Tensor, w: Tensor, bias: Tensor | None, counts: Tensor, order: Tensor | None, top_k: int, activation: int,
                 limit: float, alpha: float, save: bool, tiles: list[int]) -> tuple[Tensor, Tensor]:
    import triton
    import triton.runtime.errors

    from moec.backends.triton.kernels import glu_gemm_kernel

    gated, (half, up_weight) = w.dim() == 4, _halves(w)
    rows, (experts, hidden, width) = routed_rows(x, order), half.shape
    tile = tile_for(x, half, rows, tiles)
    h = x.new_zeros(rows, hidden)
    pre = x.new_zeros(_pre_layout(rows, w)) if save else x.new_empty(0)
    pre_rows = pre.view(rows, _pre_width(w)) if save else h
    grid = (triton.cdiv(rows, tile.BM) + experts, triton.cdiv(hidden, tile.BN))
    args = (x, w, bias if bias is not None else w, h, pre_rows, counts, order if order is not None else counts, experts, width, hidden,
            x.stride(0), x.stride(1), w.stride(0), w.stride(-1), w.stride(-2), up_weight,
            bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None and gated else 0,
            h.stride(0), h.stride(1), pre_rows.stride(0), hidden if gated and save else 0, limit, alpha)
    meta = {"TOP_K": top_k, "GATHER": order is not None, "GATED": gated, "HAS_BIAS": bias is not None,
            "ACTIVATION": activation, "SAVE": save, "BLOCK_E": experts_block(experts), "BM": tile.BM, "BN": tile.BN, "BK": tile.BK,
            "PRECISION": precision_of(x), "UPCAST": x.device.type == "cpu", "num_warps": tile.warps}
    key = (tile, x.dtype, gated, x.device.index)
    for stages in range(_STAGES.get(key, tile.stages), 0, -1):  # the plain GEMM's tile: two B tiles per stage may not fit
        try:
            glu_gemm_kernel[grid](*args, **meta, num_stages=stages)
            _STAGES[key] = stages
            break
        except triton.runtime.errors.OutOfResources:
            if stages == 1:
                raise
    return h, pre


@_grouped_glu.register_fake
def _(x, w, bias, counts, order, top_k, activation, limit, alpha, save, tiles):
    rows = routed_rows(x, order)
    return x.new_empty(rows, _halves(w)[0].shape[1]), x.new_empty(_pre_layout(rows, w)) if save else x.new_empty(0)


@torch.library.custom_op("moec::triton_grouped_glu_backward", mutates_args=())
def _grouped_glu_backward(grad: Tensor, x: Tensor, w: Tensor, has_bias: bool, counts: Tensor, order: Tensor | None, top_k: int,
                          activation: int, limit: float, alpha: float, pre: Tensor,
                          tiles: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    import triton

    from moec.backends.triton.kernels import glu_backward_kernel

    gated, half = w.dim() == 4, _halves(w)[0]
    rows, hidden, width = grad.shape[0], half.shape[1], half.shape[2]
    grad_pre = torch.empty_like(pre)
    glu_backward_kernel[(triton.cdiv(grad.numel(), ELEMENTWISE_BLOCK),)](
        grad, pre, grad_pre, grad.numel(), hidden, _pre_width(w), hidden if gated else 0, limit, alpha, GATED=gated,
        ACTIVATION=activation, BLOCK=ELEMENTWISE_BLOCK)
    # gate and up as one operand: [M, 2H] rows against each expert's [2H, D] weight, in one GEMM each way
    grad_pre_rows, w_rows = grad_pre.view(rows, _pre_width(w)), w.view(w.shape[0], _pre_width(w), width)
    tile = tile_for(x, half, rows, tiles)
    grad_rows = launch_grouped_gemm(grad_pre_rows, (w_rows, w_rows.stride(0), w_rows.stride(1), w_rows.stride(2)), counts, None, 1,
                                    rows, width, tile)
    grad_x = rows_to_tokens(grad_rows, order, x.shape[0], top_k)
    grad_w = launch_weight_grad(grad_pre_rows, x, counts, order, top_k, w_rows.shape, tile).view(w.shape)
    grad_b = launch_bias_grad(grad_pre_rows, counts, w.dtype, tile).view(w.shape[:-1]) if has_bias else w.new_empty(0)
    return grad_x, grad_w, grad_b


@_grouped_glu_backward.register_fake
def _(grad, x, w, has_bias, counts, order, top_k, activation, limit, alpha, pre, tiles):
    return torch.empty_like(x), torch.empty_like(w), w.new_empty(w.shape[:-1]) if has_bias else w.new_empty(0)


def _setup(ctx, inputs, output) -> None:
    x, w, bias, counts, order, top_k, activation, limit, alpha, save, tiles = inputs
    ctx.save_for_backward(x, w, counts, order, output[1])
    ctx.top_k, ctx.activation, ctx.clamp, ctx.tiles, ctx.save = top_k, activation, (limit, alpha), tiles, save
    ctx.has_bias = bias is not None


def _backward(ctx, grad: Tensor, _grad_pre):
    x, w, counts, order, pre = ctx.saved_tensors
    assert ctx.save, "moec::triton_grouped_glu ran without saving its pre-activations (save=False) but a gradient is asked"
    grad_x, grad_w, grad_b = _grouped_glu_backward(grad.contiguous(), x, w, ctx.has_bias, counts, order, ctx.top_k, ctx.activation,
                                                   *ctx.clamp, pre, ctx.tiles)
    return grad_x, grad_w, grad_b if ctx.has_bias else None, *[None] * 8


_grouped_glu.register_autograd(_backward, setup_context=_setup)


def grouped_glu(x: Tensor, w: Tensor, counts: Tensor, order: Tensor | None, top_k: int, activation: str,
                tiles: tuple[int, ...] | None = None, limit: float = 0.0, alpha: float = 0.0, bias: Tensor | None = None) -> Tensor:
    """``act(gate) * up`` (or ``act(up)``) of each row's expert, the activation in the GEMM's epilogue
    (``activation`` a name of the activation registry, ``moec.moe.ACTIVATIONS``; a clamped one reads ``limit``
    and ``alpha``). A gated activation reads ``w`` [E, 2, H, D] (``experts.w_gate_up``, gate half first) and
    ``bias`` [E, 2, H]; another ``w`` [E, H, D] and ``bias`` [E, H]; biases are added before the activation."""
    assert is_gated(activation) == (w.dim() == 4), f"{activation}: a gated activation reads [E, 2, H, D], another [E, H, D]"
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, bias))
    bias = bias.contiguous() if bias is not None else None  # parameters are: no copy
    h, _ = _grouped_glu(x.contiguous(), w.contiguous(), bias, counts, order, top_k, triton_epilogue(activation), limit, alpha, save,
                        list(tiles or ()))
    return h
