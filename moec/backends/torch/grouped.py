"""Grouped GEMMs that compile in every dtype: copied verbatim into each build's ``model_support.py``.

``grouped_linear(x, w, offsets)`` is ``F.linear`` per expert group of consecutive rows:
rows ``offsets[e-1]:offsets[e]`` of ``x`` [M, K] times ``w[e]`` [N, K] (the parameters'
own layout, [E, out, in]) -> [M, N]. Which kernel runs:

- bf16 inputs, or fp32 inputs under bf16 autocast (what an MoE sees under autocast, since
  ``rms_norm`` returns fp32): ``torch.nn.functional.grouped_mm`` in bf16, the native kernel.
  Counts and offsets stay on the device: no host sync, CUDA graphs possible.
- Other inputs on a GPU: the Triton grouped GEMM (``moec.backends.triton``), also sync-free;
  torch's own fallback for non-bf16 copies the offsets to the host and loops in Python.
- fp32 on the CPU: the custom op ``moec::grouped_linear``. With torch 2.13
  ``torch.compile`` of ``F.grouped_mm`` accepts only bf16 (its meta kernel rejects fp32), so
  the op is opaque to the compiler, with a fake implementation and its own backward:
  ``grad_x = grad @ w`` and ``grad_w[e] = grad[e].T @ x[e]``, both grouped GEMMs, the
  weight gradient written straight in the parameter's layout (an autograd transpose would
  make AccumulateGrad copy every expert weight's gradient once more per step). Eager
  ``F.grouped_mm`` runs fp32 on the CPU when strides are 16-byte aligned; otherwise a loop
  over the (host) offsets runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NATIVE_DTYPES = (torch.bfloat16,)  # what F.grouped_mm's fast kernels and torch.compile accept


def grouped_linear(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """[M, K] rows grouped by expert, [E, N, K] weights, int32 group ends [E] -> [M, N]."""
    autocast = _autocast_dtype(x.device)
    if autocast in NATIVE_DTYPES:
        x, w = x.to(autocast), w.to(autocast)
    if x.dtype in NATIVE_DTYPES and w.dtype == x.dtype:
        return F.grouped_mm(x, w.transpose(1, 2), offs=offsets)
    if x.device.type == "cuda" and _triton_grouped_linear() is not None:
        return _triton_grouped_linear()(x, w, torch.diff(offsets, prepend=offsets.new_zeros(1)))
    return _grouped_linear(x, w, offsets)


def _triton_grouped_linear():
    """moec's Triton grouped GEMM; None where moec is not installed (a build directory on its own: the loop below)."""
    try:
        from moec.backends.triton import grouped_linear
    except ImportError:
        return None
    return grouped_linear


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _native_ok(*tensors: Tensor) -> bool:
    """The CPU grouped_mm kernel needs 16-byte aligned strides (e.g. widths that are multiples of 4 in fp32)."""
    return all(t.device.type == "cpu" and all((st * t.element_size()) % 16 == 0 for st in t.stride() if st != 1) for t in tensors)


def _groups(offsets: Tensor) -> list[tuple[int, int]]:
    bounds = [0] + offsets.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _matmul_grouped(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """[M, K] x [E, K, N] per row group -> [M, N] (fp32 CPU, or any device through the loop)."""
    if _native_ok(a, b):
        return F.grouped_mm(a, b, offs=offsets)
    out = a.new_zeros(a.shape[0], b.shape[-1])
    for expert, (start, end) in enumerate(_groups(offsets)):
        torch.mm(a[start:end], b[expert], out=out[start:end])
    return out


def _define_ops():
    """Register ``moec::grouped_linear`` (with its fake kernel and backward) and its two gradient ops."""

    @torch.library.custom_op("moec::grouped_linear", mutates_args=())
    def grouped_linear_op(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
        return _matmul_grouped(x, w.transpose(1, 2), offsets)

    @grouped_linear_op.register_fake
    def _(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], w.shape[1])

    @torch.library.custom_op("moec::grouped_linear_weight_grad", mutates_args=())
    def weight_grad(grad: Tensor, x: Tensor, offsets: Tensor) -> Tensor:
        """d(loss)/d(w)[e] = grad[group e].T @ x[group e], shape [E, N, K] (the weight's layout)."""
        if _native_ok(grad, x):
            return F.grouped_mm(grad.t(), x, offs=offsets)
        out = x.new_zeros(offsets.shape[0], grad.shape[1], x.shape[1])
        for expert, (start, end) in enumerate(_groups(offsets)):
            torch.mm(grad[start:end].t(), x[start:end], out=out[expert])
        return out

    @weight_grad.register_fake
    def _(grad: Tensor, x: Tensor, offsets: Tensor) -> Tensor:
        return x.new_empty(offsets.shape[0], grad.shape[1], x.shape[1])

    @torch.library.custom_op("moec::grouped_linear_input_grad", mutates_args=())
    def input_grad(grad: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
        """d(loss)/d(x)[group e] = grad[group e] @ w[e], shape [M, K]."""
        return _matmul_grouped(grad, w, offsets)

    @input_grad.register_fake
    def _(grad: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
        return grad.new_empty(grad.shape[0], w.shape[2])

    def setup(ctx, inputs, output) -> None:
        x, w, offsets = inputs
        ctx.save_for_backward(x, w, offsets)

    def backward(ctx, grad: Tensor):
        x, w, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = input_grad(grad, w, offsets) if ctx.needs_input_grad[0] else None
        grad_w = weight_grad(grad, x, offsets) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None

    grouped_linear_op.register_autograd(backward, setup_context=setup)
    return grouped_linear_op


# Registered once per process: moec's copy and a build's model_support.py share whichever came first (a second
# registration would replace the first one's kernels under the callers that still hold it).
_grouped_linear = torch.ops.moec.grouped_linear if hasattr(torch.ops.moec, "grouped_linear") else _define_ops()
