"""Routed experts on rows sorted by expert, on this rank or across an expert-parallel group.

``experts_ffn(rows, counts, w_up, w_gate, w_down, fn, biases=(), clamp=None)``: ``rows`` (M, D) are the
(token, choice) rows sorted by global expert id, ``counts`` (E,) how many rows each expert gets; ``fn``
the activation (a ``torch.nn.functional`` name, or ``clamped_glu`` with ``clamp = (limit, alpha)``,
GPT-OSS's), ``biases`` the experts' ``(b_up, b_gate or None, b_down)`` [E, ...], split like the weights.
With plain tensors every expert is local: one grouped GEMM per projection. With DTensor
weights sharded ``Shard(0)`` over an expert-parallel mesh (rank r holds weight rows
[r*E/P, (r+1)*E/P): experts in id order, or in the weights' ``expert_order`` when
``sharding.placement`` is consistent_hash, the rows regrouped to match), only the routed rows travel:

1. exchange the per-expert counts (all-to-all of P x E/P integers);
2. send each rank the rows of its experts (``all_to_all_single`` with autograd);
3. regroup the received rows by local expert, grouped GEMMs with the local weights;
4. send the results back (the reverse all-to-all) in the original row order.

When the expert-parallel axis does not split the batch (``sharding.batch`` leaves it out), every
rank of the group holds the same rows: each runs the rows of its own experts and an all-gather
of the outputs gives every rank all of them (``replicated_rows`` set on the weights by parallel.py).

The split sizes are host integers, so the expert-parallel path is kept out of ``torch.compile``'s
graph; with plain tensors (one process) ``experts_ffn`` is traced like any grouped GEMM.
Gradients: the reverse all-to-all carries every rank's row gradients to the expert's owner,
so a local expert's gradient sums the contributions of all ranks' tokens.

A build's ``model_support.py`` holds a copy (the process group comes from the DTensor weights'
mesh); the trainer reads the copy's ``SENT`` (``moec.backends.torch.loader.support_module``).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor

from moec.backends.torch.grouped import grouped_linear
from moec.backends.torch.phases import phase
from moec.backends.torch.snippets import clamped_glu

# Bytes this process sent in the forward all-to-alls since the trainer last read it (rows there
# and back); the backward sends the same amount again. Only routed rows travel, never the batch.
SENT = {"bytes": 0}


def local_ffn(rows: Tensor, group_sizes: Tensor, w_up: Tensor, w_gate: Tensor | None, w_down: Tensor, fn: str,
              biases: tuple = (), clamp: tuple[float, float] | None = None) -> Tensor:
    """down(fn(gate(x)) * up(x)) (or down(fn(up(x)))) per expert group of consecutive rows, with each
    expert's biases when given."""
    offsets = torch.cumsum(group_sizes, 0).to(torch.int32)
    b_up, b_gate, b_down = _row_biases(biases, group_sizes, rows.shape[0])
    up = grouped_linear(rows, w_up, offsets) + b_up
    if fn == "clamped_glu":
        hidden = clamped_glu(grouped_linear(rows, w_gate, offsets) + b_gate, up, *clamp)
    else:
        act = getattr(F, fn)
        hidden = act(grouped_linear(rows, w_gate, offsets) + b_gate) * up if w_gate is not None else act(up)
    return grouped_linear(hidden, w_down, offsets) + b_down


def _row_biases(biases: tuple, group_sizes: Tensor, rows: int) -> tuple:
    """Each row's expert's (b_up, b_gate, b_down) rows; zeros (added as 0) without biases."""
    if not biases:
        return 0, 0, 0
    expert = torch.repeat_interleave(torch.arange(len(group_sizes), device=group_sizes.device), group_sizes, output_size=rows)
    return tuple(0 if bias is None else bias[expert] for bias in biases)


def expert_group(weight) -> tuple:
    """The expert-parallel process group and its size: the mesh dim where the [E, ...] weight is
    sharded on dim 0 (under FSDP the unsharded weight also has the FSDP dims, replicated; under tensor
    parallelism the tp dim, which splits each expert's hidden size)."""
    mesh = weight.device_mesh
    (dim,) = [i for i, placement in enumerate(weight.placements) if placement.is_shard(0)]
    return mesh.get_group(dim), mesh.size(dim)


def experts_ffn(rows: Tensor, counts: Tensor, w_up: Tensor, w_gate: Tensor | None, w_down: Tensor, fn: str,
                biases: tuple = (), clamp: tuple[float, float] | None = None) -> Tensor:
    ffn = functools.partial(local_ffn, fn=fn, biases=biases, clamp=clamp)
    if not isinstance(w_up, DTensor):  # one process: traced by torch.compile like any grouped GEMM, no graph break
        return ffn(rows, counts, w_up, w_gate, w_down)
    return _expert_parallel_ffn(rows, counts, w_up, w_gate, w_down, ffn)


def _local(ffn: functools.partial) -> functools.partial:
    """``ffn`` (``local_ffn`` with the layer's activation and biases) with this rank's rows of the expert
    biases (DTensors sharded like the weights)."""
    biases = tuple(bias.to_local() if isinstance(bias, DTensor) else bias for bias in ffn.keywords["biases"])
    return functools.partial(ffn, biases=biases)


@torch.compiler.disable
def _expert_parallel_ffn(rows: Tensor, counts: Tensor, w_up: Tensor, w_gate: Tensor | None, w_down: Tensor, ffn) -> Tensor:
    # Every rank of the expert-parallel group holds the same rows when ep is not a batch axis.
    exchange = _split_replicated if getattr(w_up, "replicated_rows", False) else _exchange
    order = getattr(w_up, "expert_order", None)  # the expert in each weight row, set when not contiguous
    if order is None:
        return exchange(rows, counts, w_up, w_gate, w_down, ffn)
    # Weight rows are grouped by owner rank (placement consistent_hash): regroup the routed rows
    # from expert order into weight-row order, exchange, and put the results back.
    expert_at = torch.tensor(order, device=rows.device)
    row_of_expert = torch.empty_like(expert_at).index_copy_(0, expert_at, torch.arange(len(order), device=rows.device))
    regroup = torch.argsort(row_of_expert.repeat_interleave(counts), stable=True)
    out = exchange(rows[regroup], counts[expert_at], w_up, w_gate, w_down, ffn)
    return torch.empty_like(out).index_copy(0, regroup, out)


def _exchange(rows: Tensor, counts: Tensor, w_up: Tensor, w_gate: Tensor | None, w_down: Tensor, ffn) -> Tensor:
    """Rows sorted by weight row, ``counts`` per weight row; rank r holds rows [r*E/P, (r+1)*E/P)."""
    group, ranks = expert_group(w_up)
    local = [w.to_local() if w is not None else None for w in (w_up, w_gate, w_down)]
    send = counts.view(ranks, -1)  # (P, E/P): rows for each destination rank, per its local expert
    received_counts = torch.empty_like(send)
    with phase("moe.all_to_all"):
        dist.all_to_all_single(received_counts, send, group=group)  # (P, E/P): rows from each source, per my expert
        send_sizes, receive_sizes = send.sum(1).tolist(), received_counts.sum(1).tolist()
        received = funcol.all_to_all_single_autograd(rows, receive_sizes, send_sizes, group)  # differentiable: the reverse in backward
    me = dist.get_rank(group)
    SENT["bytes"] += 2 * (sum(send_sizes) - send_sizes[me]) * rows.shape[1] * rows.element_size()  # rows leaving this rank
    # Received rows come by source rank, then local expert; group them by local expert (stable).
    local_experts = torch.arange(send.shape[1], device=rows.device).repeat(ranks)
    expert_of_row = torch.repeat_interleave(local_experts, received_counts.reshape(-1))
    order = torch.argsort(expert_of_row, stable=True)
    with phase("moe.experts"):
        out = _local(ffn)(received[order], received_counts.sum(0), *local)
    back = torch.empty_like(out).index_copy(0, order, out)  # undo the grouping
    with phase("moe.all_to_all"):
        return funcol.all_to_all_single_autograd(back, send_sizes, receive_sizes, group)


def _split_replicated(rows: Tensor, counts: Tensor, w_up: Tensor, w_gate: Tensor | None, w_down: Tensor, ffn) -> Tensor:
    """Rows sorted by weight row, the same on every rank of the group (ep is not a batch axis): each
    rank runs the rows of its own experts, then an all-gather gives every rank all the outputs.
    Backward mirrors it: a rank's rows get their gradient from the rank that ran them (each rank's
    gradient of the output is the same, so its own slice is all it needs)."""
    group, ranks = expert_group(w_up)
    local = [w.to_local() if w is not None else None for w in (w_up, w_gate, w_down)]
    me = dist.get_rank(group)
    per_rank = counts.view(ranks, -1)
    sizes = per_rank.sum(1).tolist()  # rows run by each rank, known everywhere: the counts are the same
    SENT["bytes"] += sizes[me] * (ranks - 1) * rows.shape[1] * rows.element_size()  # my outputs to every other rank
    mine = _RowsOfRank.apply(rows, sizes, group)
    with phase("moe.experts"):
        out = _local(ffn)(mine, per_rank[me], *local)
    return _GatherRows.apply(out, sizes, group)


def _all_gather_rows(part: Tensor, sizes: list[int], group) -> Tensor:
    """Every rank's ``part`` (``sizes[r]`` rows from rank r), concatenated in rank order, on every rank."""
    ranks = len(sizes)
    out = part.new_empty(sum(sizes), *part.shape[1:])
    with phase("moe.all_to_all"):  # forward and backward
        dist.all_to_all_single(out, part.repeat(ranks, *([1] * (part.dim() - 1))), sizes, [part.shape[0]] * ranks, group=group)
    return out


def _own_rows(sizes: list[int], group) -> slice:
    """This rank's rows of the shared ones: rank r runs ``sizes[r]`` rows, after those of ranks < r."""
    me = dist.get_rank(group)
    start = sum(sizes[:me])
    return slice(start, start + sizes[me])


class _RowsOfRank(torch.autograd.Function):
    """Forward: this rank's slice of rows the group shares. Backward: the slices' gradients, gathered."""

    @staticmethod
    def forward(ctx, rows: Tensor, sizes: list[int], group) -> Tensor:
        ctx.sizes, ctx.group = sizes, group
        return rows[_own_rows(sizes, group)]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather_rows(grad.contiguous(), ctx.sizes, ctx.group), None, None


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's slice, gathered. Backward: this rank's slice of the (shared) gradient."""

    @staticmethod
    def forward(ctx, part: Tensor, sizes: list[int], group) -> Tensor:
        ctx.sizes, ctx.group = sizes, group
        return _all_gather_rows(part.contiguous(), sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[_own_rows(ctx.sizes, ctx.group)], None, None
