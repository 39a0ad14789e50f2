"""What generated ``model.py`` files import: grouped GEMMs that compile in every dtype.

``grouped_mm(x, w, offsets)`` multiplies consecutive row groups of ``x`` [N, K] by the
matching expert matrix of ``w`` [E, K, M]; group ``e`` is rows ``offsets[e-1]:offsets[e]``.

- bf16 inputs use ``torch.nn.functional.grouped_mm`` directly (the native kernel).
- fp32 inputs go through the custom op ``moec::grouped_mm`` (forward) and
  ``moec::grouped_mm_weight_grad`` (the weight gradient), each with a fake implementation,
  because with torch 2.13 ``torch.compile`` of ``F.grouped_mm`` accepts only bf16 (its meta
  kernel rejects fp32). Inside the ops, eager ``F.grouped_mm`` runs fp32 on the CPU when the
  strides are 16-byte aligned; on a GPU (where the native kernel wants bf16) or with odd
  widths, a per-expert loop over the offsets runs instead.
  The ops are opaque to the compiler, so the loop's ``.tolist()`` never reaches the graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    if x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16:
        return F.grouped_mm(x, w, offs=offsets)
    return _grouped_mm(x, w, offsets)


def _native_ok(*tensors: Tensor) -> bool:
    """The CPU grouped_mm kernel needs 16-byte aligned strides (e.g. widths that are multiples of 4 in fp32)."""
    return all(t.device.type == "cpu" and all((st * t.element_size()) % 16 == 0 for st in t.stride() if st != 1) for t in tensors)


def _groups(offsets: Tensor) -> list[tuple[int, int]]:
    bounds = [0] + offsets.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


@torch.library.custom_op("moec::grouped_mm", mutates_args=())
def _grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    if _native_ok(x, w):
        return F.grouped_mm(x, w, offs=offsets)
    out = x.new_zeros(x.shape[0], w.shape[-1])
    for expert, (start, end) in enumerate(_groups(offsets)):
        out[start:end] = x[start:end] @ w[expert]
    return out


@_grouped_mm.register_fake
def _(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("moec::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad(x: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    """d(loss)/d(w)[e] = x[group e].T @ grad[group e], shape [E, K, M]."""
    if _native_ok(x, grad):
        return F.grouped_mm(x.t(), grad, offs=offsets)
    out = x.new_zeros(offsets.shape[0], x.shape[1], grad.shape[1])
    for expert, (start, end) in enumerate(_groups(offsets)):
        out[expert] = x[start:end].t() @ grad[start:end]
    return out


@_grouped_mm_weight_grad.register_fake
def _(x: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    return x.new_empty(offsets.shape[0], x.shape[1], grad.shape[1])


def _setup(ctx, inputs, output) -> None:
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _backward(ctx, grad: Tensor):
    x, w, offsets = ctx.saved_tensors
    grad_x = _grouped_mm(grad, w.transpose(1, 2).contiguous(), offsets) if ctx.needs_input_grad[0] else None
    grad_w = _grouped_mm_weight_grad(x, grad, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_grouped_mm.register_autograd(_backward, setup_context=_setup)


def reference_op(op: str, attrs: dict, training: bool, seq: int, *args: Tensor):
    """An unfused routing / spectral op, run by the reference interpreter's kernel.

    Generated code calls this only when a fusion pass was disabled: correct, eager and slow
    (per-expert loops), and ``torch.compile`` breaks the graph here.
    """
    from moec.backends.reference.interpreter import KERNELS, Context

    ctx = Context(training=training, device=args[0].device if args else torch.device("cpu"), symbols={"S": seq})
    return KERNELS[op](ctx, attrs, *args)
