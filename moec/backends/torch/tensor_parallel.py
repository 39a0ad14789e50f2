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

The vocabulary splits too (``embed`` and ``head`` in ``sharding.tensor.column``): each rank holds
V / tp rows of the embedding table and of the head. ``embedding`` looks up the tokens in this rank's
rows (zeros for the others) and sums over the ranks; the head's logits stay split along the
vocabulary, and ``cross_entropy`` computes the loss from the split logits with torch's
``loss_parallel`` (max, sum of exponentials and the target's logit reduced over tp; no rank
gathers [B, S, V]).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel

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


def _done(x: Tensor) -> Tensor:
    """A functional collective's result, waited for when it ran eagerly. Eager funcol returns an
    AsyncCollectiveTensor that waits on first use by an eager op; a compiled graph it flows into (a
    block's forward or backward fed by the eager root: the vocab-parallel embedding and head) reads its
    storage without waiting. Traced collectives are plain tensors: nothing to do."""
    return x.wait() if isinstance(x, funcol.AsyncCollectiveTensor) else x


def _all_reduce(x: Tensor, group) -> Tensor:
    """``x`` summed over the group (all-reduce), done."""
    return _done(funcol.all_reduce(x.contiguous(), "sum", group))


def _all_gather_sequence(x: Tensor, group) -> Tensor:
    """Every rank's [B, S/tp, ...] concatenated along the sequence (all-gather of dim 1), done."""
    return _done(funcol.all_gather_tensor(x.contiguous(), 1, group))


def _reduce_scatter_sequence(x: Tensor, group) -> Tensor:
    """``x`` summed over the group, this rank's part of the sequence (reduce-scatter of dim 1), done."""
    return _done(funcol.reduce_scatter_tensor(x.contiguous(), "sum", 1, group))


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
        return _all_reduce(grad, ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        return _all_reduce(x, group)

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
        return (whole if ctx.partial else _all_reduce(whole, ctx.group)), None, None, None


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
        return _all_gather_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _reduce_scatter_sequence(grad, ctx.group), None


class _ScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _reduce_scatter_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather_sequence(grad, ctx.group), None


class _SplitSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(size, dim=1)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather_sequence(grad, ctx.group), None


class _UnsplitSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _all_gather_sequence(x, group)

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


# Vocabulary parallelism (Megatron's VocabParallelEmbedding and parallel cross-entropy).

def embedding(tokens: Tensor, weight: Tensor, padding_idx: int | None = None) -> Tensor:
    """The rows of ``tokens`` from a table split along the vocabulary: ``weight`` holds this rank's V / tp rows
    (the whole table without a group). A token outside them reads zeros here; g sums the ranks' lookups."""
    group = _GROUP["group"]
    if group is None:
        return F.embedding(tokens, weight, padding_idx)
    rows = weight.shape[0]
    start = dist.get_rank(group) * rows
    index = tokens - start
    outside = (index < 0) | (index >= rows)
    pad = padding_idx - start if padding_idx is not None and start <= padding_idx < start + rows else None
    found = F.embedding(index.masked_fill(outside, 0), weight, pad).masked_fill(outside.unsqueeze(-1), 0.0)
    return reduce(found)


def cross_entropy(logits: Tensor, targets: Tensor, vocab_mesh: DeviceMesh | None = None) -> Tensor:
    """The mean cross-entropy of ``logits`` [..., V] (fp32) against ``targets`` [...]. With ``vocab_mesh`` the
    logits are this rank's V / tp columns: torch's ``loss_parallel`` reduces over the mesh; the backward must
    run inside ``loss_context(vocab_mesh)``."""
    flat, flat_targets = logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if vocab_mesh is None:
        return F.cross_entropy(flat, flat_targets)
    with _loss_parallel():
        return F.cross_entropy(DTensor.from_local(flat, vocab_mesh, [Shard(1)]), flat_targets).to_local()


def loss_context(vocab_mesh: DeviceMesh | None) -> contextlib.AbstractContextManager:
    """Where the backward of a vocab-parallel ``cross_entropy`` runs (torch's ``loss_parallel``); else nothing."""
    return _loss_parallel() if vocab_mesh is not None else contextlib.nullcontext()


_LOSS_PARALLEL_DEPTH = [0]


@contextlib.contextmanager
def _loss_parallel():
    """torch's ``loss_parallel``, re-entrant: leaving it switches its loss ops off for everyone, so a loss computed
    inside an enclosing one (the pipeline schedule runs the loss and its backward in one step) must not leave it."""
    if _LOSS_PARALLEL_DEPTH[0]:
        yield
        return
    _LOSS_PARALLEL_DEPTH[0] += 1
    try:
        with loss_parallel():
            yield
    finally:
        _LOSS_PARALLEL_DEPTH[0] -= 1
