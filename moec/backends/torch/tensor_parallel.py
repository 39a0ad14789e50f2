"""Megatron-style tensor parallelism as a generated ``model.py`` calls it.

A program built from a spec with ``sharding.tensor`` (tp > 1) reads each split weight through
``local`` (a rank's shard when the generated ``parallel.py`` made it a DTensor, the whole weight
otherwise), takes head counts from the width of the local projections, and marks the two ends
of every split group with Megatron's conjugate functions:

- ``copy`` (Megatron's *f*) before a column group (attention q/k/v, MLP up/gate, expert
  up/gate): identity forward; backward all-reduces the input's gradient, since each rank's
  columns contribute only part of it.
- ``reduce`` (Megatron's *g*) after a row group (attention out, MLP down, expert down):
  all-reduces the partial sums forward; identity backward.

Both are autograd functions on functional collectives over the group ``parallel.py`` sets, so
``torch.compile`` traces them into the graph. Without a group (one process) both are the
identity and ``local`` returns the whole weight: the same ``model.py`` runs on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.distributed.tensor import DTensor

_GROUP: dict[str, dist.ProcessGroup | None] = {"group": None}


def set_tensor_group(group: dist.ProcessGroup | None) -> None:
    """The ranks of one tensor-parallel group (the spec's ``sharding.tensor.axis``), or None."""
    _GROUP["group"] = group


def tensor_group() -> dist.ProcessGroup | None:
    return _GROUP["group"]


def local(weight: Tensor) -> Tensor:
    """This rank's shard of a split weight (a DTensor on the tp mesh); a plain weight as it is."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return funcol.all_reduce(grad.contiguous(), "sum", ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        return funcol.all_reduce(x.contiguous(), "sum", group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def copy(x: Tensor) -> Tensor:
    """Megatron's f: identity forward, gradient summed over the tensor-parallel ranks backward."""
    group = _GROUP["group"]
    return x if group is None else _Copy.apply(x, group)


def reduce(x: Tensor) -> Tensor:
    """Megatron's g: partial sums of a row-split product summed over the tensor-parallel ranks."""
    group = _GROUP["group"]
    return x if group is None else _Reduce.apply(x, group)
