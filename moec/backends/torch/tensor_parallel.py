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

- ``kv_shard`` reads the k / v projection of a grouped-query attention layer with fewer KV heads
  than ranks (``tp % kv_heads == 0``): the weight stays whole on every rank and each reads the
  rows of the KV head its query heads use; backward sums the slices' gradients over the ranks.

All are autograd functions on functional collectives over the group ``parallel.py`` sets, so
``torch.compile`` traces them into the graph. Without a group (one process) they are the
identity and ``local`` returns the whole weight: the same ``model.py`` runs on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor

_GROUP: dict[str, dist.ProcessGroup | None] = {"group": None}


def set_tensor_group(group: dist.ProcessGroup | None) -> None:
    """The ranks of one tensor-parallel group (the spec's ``sharding.tensor.axis``), or None."""
    _GROUP["group"] = group


def tensor_group() -> dist.ProcessGroup | None:
    return _GROUP["group"]


def _over_group(function: type[torch.autograd.Function], x: Tensor) -> Tensor:
    """``function`` applied over the tensor-parallel group; without one (one process) the identity."""
    group = _GROUP["group"]
    return x if group is None else function.apply(x, group)


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
    return _over_group(_Copy, x)


def reduce(x: Tensor) -> Tensor:
    """Megatron's g: partial sums of a row-split product summed over the tensor-parallel ranks."""
    return _over_group(_Reduce, x)


def kv_head_of(rank: int, ranks: int, kv_heads: int) -> int:
    """The KV head tensor-parallel ``rank`` of ``ranks`` reads when ``ranks`` is a multiple of ``kv_heads``."""
    return rank * kv_heads // ranks


class _KvShard(torch.autograd.Function):
    """The rows of this rank's KV head of a whole [kv_heads * head_dim, ...] weight. Query heads split
    evenly over tp and head h reads KV head h // (heads / kv_heads), so rank r's heads all read KV head
    r // (tp / kv_heads). Backward: the slice's gradient in place in a zero whole-size gradient, summed
    over tp (unless ``partial``), so every rank's whole weight gets the gradient of all the query heads."""

    @staticmethod
    def forward(ctx, weight: Tensor, kv_heads: int, partial: bool, group) -> Tensor:
        rows = weight.shape[0] // kv_heads
        head = kv_head_of(dist.get_rank(group), dist.get_world_size(group), kv_heads)
        ctx.group, ctx.partial, ctx.pad = group, partial, (head * rows, weight.shape[0] - (head + 1) * rows)
        return weight.narrow(0, head * rows, rows).clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        before, after = ctx.pad
        whole = F.pad(grad, (0, 0) * (grad.dim() - 1) + (before, after))
        return (whole if ctx.partial else funcol.all_reduce(whole.contiguous(), "sum", ctx.group)), None, None, None


def kv_shard(weight: Tensor, kv_heads: int, partial: bool = False) -> Tensor:
    """The rows of the KV head this rank's query heads read, from a k / v projection kept whole on every
    tensor-parallel rank (kv_heads < tp); without a group (one process) the whole weight. ``partial``
    (sequence parallelism): the gradient is left a per-rank partial sum, as the norms' are, for
    ``parallel.py``'s ``reduce_gradients`` to sum over tp with the blocks' other whole weights."""
    group = _GROUP["group"]
    return weight if group is None else _KvShard.apply(weight, kv_heads, partial, group)


# Sequence parallelism (Megatron-SP): between the tensor-parallel groups each rank holds S / tp
# positions of the hidden state, so norms and residual adds run on a slice. f becomes an all-gather
# along the sequence (its backward a reduce-scatter), g a reduce-scatter (its backward an all-gather).

class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return funcol.all_gather_tensor(x.contiguous(), 1, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return funcol.reduce_scatter_tensor(grad.contiguous(), "sum", 1, ctx.group), None


class _ScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return funcol.reduce_scatter_tensor(x.contiguous(), "sum", 1, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return funcol.all_gather_tensor(grad.contiguous(), 1, ctx.group), None


class _SplitSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(size, dim=1)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return funcol.all_gather_tensor(grad.contiguous(), 1, ctx.group), None


class _UnsplitSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return funcol.all_gather_tensor(x.contiguous(), 1, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # every rank computed the same loss from the whole sequence: keep its own part
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(size, dim=1)[rank].contiguous(), None


def gather_sequence(x: Tensor) -> Tensor:
    """Sequence parallel's f: the whole sequence [B, S, D] from every rank's [B, S/tp, D]."""
    return _over_group(_GatherSequence, x)


def scatter_sequence(x: Tensor) -> Tensor:
    """Sequence parallel's g: the partial sums of a row-split product, summed and split along the sequence."""
    return _over_group(_ScatterSequence, x)


def unsplit_sequence(x: Tensor) -> Tensor:
    """The whole hidden state after the blocks, for the replicated final norm and head (``split_sequence`` undone)."""
    return _over_group(_UnsplitSequence, x)


def split_sequence(x: Tensor) -> Tensor:
    """This rank's S / tp positions of a hidden state every rank holds whole (the blocks' input)."""
    return _over_group(_SplitSequence, x)
