"""The experts' first projection with the activation fused into the GEMM's epilogue, as a torch
custom op with its own backward (opaque to torch.compile).

``moec::triton_grouped_glu(x, w_up, w_gate, b_up, b_gate, counts, order, top_k, epilogue, limit, alpha, save, tiles)``
-> (h, up, gate): ``h[m] = act(x[src(m)] @ w_gate[e].T) * (x[src(m)] @ w_up[e].T)`` when
``w_gate`` is given (swiglu, geglu, reglu: both products accumulated from one read of the
row tile, combined before the store; or GPT-OSS's clamped SwiGLU), else ``act(x[src(m)] @ w_up[e].T)``. ``w_up`` and
``w_gate`` stay the separate [E, H, D] parameters (no concatenated copy). Rows, the gather and
the tiles are those of ``moec::triton_grouped_linear`` (ops.py). ``save`` also returns the
pre-activations ``up`` and ``gate`` (else empty), which backward reads.

Backward: ``glu_backward_kernel`` turns the gradient of ``h`` into those of the
pre-activations; then the row gradients ``grad_up @ w_up[e] + grad_gate @ w_gate[e]`` (the
grouped GEMM kernel reading the weights untransposed) go back to the tokens in choice order,
and each weight gradient comes from ``weight_grad_kernel`` in the parameter's layout.
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


@torch.library.custom_op("moec::triton_grouped_glu", mutates_args=())
def _grouped_glu(x: Tensor, w_up: Tensor, w_gate: Tensor | None, b_up: Tensor | None, b_gate: Tensor | None, counts: Tensor,
                 order: Tensor | None, top_k: int, activation: int, limit: float, alpha: float, save: bool,
                 tiles: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    import triton
    import triton.runtime.errors

    from moec.backends.triton.kernels import glu_gemm_kernel

    rows, (experts, hidden, width) = routed_rows(x, order), w_up.shape
    tile = tile_for(x, w_up, rows, tiles)
    h = x.new_zeros(rows, hidden)
    up = x.new_zeros(rows, hidden) if save else x.new_empty(0)
    gate = x.new_zeros(rows, hidden) if save and w_gate is not None else x.new_empty(0)
    grid = (triton.cdiv(rows, tile.BM) + experts, triton.cdiv(hidden, tile.BN))
    args = (x, w_up, w_gate if w_gate is not None else w_up, b_up if b_up is not None else w_up, b_gate if b_gate is not None else w_up,
            h, up if save else h, gate if gate.numel() else h, counts, order if order is not None else counts, experts, width, hidden,
            x.stride(0), x.stride(1), w_up.stride(0), w_up.stride(2), w_up.stride(1), h.stride(0), h.stride(1), limit, alpha)
    meta = {"TOP_K": top_k, "GATHER": order is not None, "GATED": w_gate is not None, "HAS_BIAS": b_up is not None,
            "ACTIVATION": activation, "SAVE": save, "BLOCK_E": experts_block(experts), "BM": tile.BM, "BN": tile.BN, "BK": tile.BK,
            "PRECISION": precision_of(x), "UPCAST": x.device.type == "cpu", "num_warps": tile.warps}
    key = (tile, x.dtype, w_gate is not None, x.device.index)
    for stages in range(_STAGES.get(key, tile.stages), 0, -1):  # the plain GEMM's tile: two B tiles per stage may not fit
        try:
            glu_gemm_kernel[grid](*args, **meta, num_stages=stages)
            _STAGES[key] = stages
            break
        except triton.runtime.errors.OutOfResources:
            if stages == 1:
                raise
    return h, up, gate


@_grouped_glu.register_fake
def _(x, w_up, w_gate, b_up, b_gate, counts, order, top_k, activation, limit, alpha, save, tiles):
    rows, hidden = routed_rows(x, order), w_up.shape[1]
    up = x.new_empty(rows, hidden) if save else x.new_empty(0)
    gate = x.new_empty(rows, hidden) if save and w_gate is not None else x.new_empty(0)
    return x.new_empty(rows, hidden), up, gate


@torch.library.custom_op("moec::triton_grouped_glu_backward", mutates_args=())
def _grouped_glu_backward(grad: Tensor, x: Tensor, w_up: Tensor, w_gate: Tensor | None, has_bias: bool, counts: Tensor,
                          order: Tensor | None, top_k: int, activation: int, limit: float, alpha: float, up: Tensor,
                          gate: Tensor, tiles: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    import triton

    from moec.backends.triton.kernels import glu_backward_kernel

    gated = w_gate is not None
    grad_up = torch.empty_like(up)
    grad_gate = torch.empty_like(gate) if gated else grad_up
    glu_backward_kernel[(triton.cdiv(up.numel(), ELEMENTWISE_BLOCK),)](
        grad, up, gate if gated else up, grad_up, grad_gate, up.numel(), limit, alpha, GATED=gated, ACTIVATION=activation,
        BLOCK=ELEMENTWISE_BLOCK)
    tile = tile_for(x, w_up, grad.shape[0], tiles)
    rows, width = grad.shape[0], w_up.shape[2]
    grad_rows = launch_grouped_gemm(grad_up, (w_up, w_up.stride(0), w_up.stride(1), w_up.stride(2)), counts, None, 1, rows, width, tile)
    if gated:
        grad_rows += launch_grouped_gemm(grad_gate, (w_gate, w_gate.stride(0), w_gate.stride(1), w_gate.stride(2)), counts, None, 1,
                                         rows, width, tile)
    grad_x = rows_to_tokens(grad_rows, order, x.shape[0], top_k)
    grad_w_up = launch_weight_grad(grad_up, x, counts, order, top_k, w_up.shape, tile)
    grad_w_gate = launch_weight_grad(grad_gate, x, counts, order, top_k, w_gate.shape, tile) if gated else w_up.new_empty(0)
    grad_b_up = launch_bias_grad(grad_up, counts, w_up.dtype, tile) if has_bias else w_up.new_empty(0)
    grad_b_gate = launch_bias_grad(grad_gate, counts, w_up.dtype, tile) if has_bias and gated else w_up.new_empty(0)
    return grad_x, grad_w_up, grad_w_gate, grad_b_up, grad_b_gate


@_grouped_glu_backward.register_fake
def _(grad, x, w_up, w_gate, has_bias, counts, order, top_k, activation, limit, alpha, up, gate, tiles):
    bias = w_up.new_empty(w_up.shape[:2]) if has_bias else w_up.new_empty(0)
    gated = w_gate is not None
    return (torch.empty_like(x), torch.empty_like(w_up), torch.empty_like(w_gate) if gated else w_up.new_empty(0), bias,
            torch.empty_like(bias) if gated else w_up.new_empty(0))


def _setup(ctx, inputs, output) -> None:
    x, w_up, w_gate, b_up, _, counts, order, top_k, activation, limit, alpha, save, tiles = inputs
    _, up, gate = output
    ctx.save_for_backward(x, w_up, w_gate, counts, order, up, gate)
    ctx.top_k, ctx.activation, ctx.clamp, ctx.tiles, ctx.save = top_k, activation, (limit, alpha), tiles, save
    ctx.has_bias = b_up is not None


def _backward(ctx, grad: Tensor, _grad_up, _grad_gate):
    x, w_up, w_gate, counts, order, up, gate = ctx.saved_tensors
    assert ctx.save, "moec::triton_grouped_glu ran without saving its pre-activations (save=False) but a gradient is asked"
    grads = _grouped_glu_backward(grad.contiguous(), x, w_up, w_gate, ctx.has_bias, counts, order, ctx.top_k, ctx.activation,
                                  *ctx.clamp, up, gate, ctx.tiles)
    grad_x, grad_w_up, grad_w_gate, grad_b_up, grad_b_gate = grads
    gated = w_gate is not None
    return (grad_x, grad_w_up, grad_w_gate if gated else None, grad_b_up if ctx.has_bias else None,
            grad_b_gate if ctx.has_bias and gated else None, *[None] * 8)


_grouped_glu.register_autograd(_backward, setup_context=_setup)


def grouped_glu(x: Tensor, w_up: Tensor, w_gate: Tensor | None, counts: Tensor, order: Tensor | None, top_k: int,
                activation: str, tiles: tuple[int, ...] | None = None, limit: float = 0.0, alpha: float = 0.0,
                b_up: Tensor | None = None, b_gate: Tensor | None = None) -> Tensor:
    """``act(gate) * up`` (or ``act(up)``) of each row's expert, the activation in the GEMM's epilogue
    (``activation`` a name of the activation registry, ``moec.moe.ACTIVATIONS``; a clamped one reads ``limit``
    and ``alpha``); ``b_up`` / ``b_gate`` [E, H]: the experts' biases, added before the activation."""
    assert is_gated(activation) == (w_gate is not None), f"{activation}: w_gate must be given exactly when the activation is gated"
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_up, w_gate, b_up, b_gate))
    gate, b_up, b_gate = (t.contiguous() if t is not None else None for t in (w_gate, b_up, b_gate))
    h, _, _ = _grouped_glu(x.contiguous(), w_up.contiguous(), gate, b_up, b_gate, counts, order, top_k, triton_epilogue(activation),
                           limit, alpha,
                           save, list(tiles or ()))
    return h
