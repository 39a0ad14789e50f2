"""Routed experts, combined, on this rank or across an expert-parallel group.

``dispatch_experts(x, chosen, weights, w_in, w_down, fn, biases=(), clamp=None)``: ``x`` (N, D) the tokens,
``chosen`` / ``weights`` (N, k) each token's experts and their weights; returns (N, D), the sum over each token's
choices of ``weight * expert(x)``, in choice order. ``w_in`` is a gated expert's ``w_gate_up`` [E, 2, H, D] (gate
half first: one grouped GEMM gives both, the GLU follows) or a plain one's ``w_up`` [E, H, D]. ``fn`` is the
activation (a ``torch.nn.functional`` name, or ``clamped_glu`` with ``clamp = (limit, alpha)``, GPT-OSS's), ``biases``
the experts' ``(b_gate_up or b_up, b_down)`` [E, ...], split like the weights. With plain tensors every expert is local: (token, choice) rows sorted by expert,
one grouped GEMM per projection. With DTensor weights sharded ``Shard(0)`` over an expert-parallel mesh (rank r
holds weight rows [r*E/P, (r+1)*E/P): experts in id order, or in the weights' ``expert_order`` when
``sharding.placement`` is consistent_hash), the dispatch is deduplicated:

1. one row per (token, destination rank), not per (token, choice): a token routed to several experts of one
   rank travels there once; beside the rows go the (token, choice) pairs (their weight, local expert and row);
2. the rows and pairs travel by ``all_to_all_single`` (with autograd for the rows and the weights);
3. the destination fans each row out to its local experts (grouped GEMMs over the pairs sorted by expert) and
   combines their weighted outputs into one row per (token, source rank);
4. those rows go back (the reverse all-to-all) and each token sums its destinations' rows.

With router groups that line up with the ranks (``router.groups`` a multiple of ep, contiguous placement) a
token reaches at most ``router.top_groups`` ranks: DeepSeek-V3's node-limited routing.

When the expert-parallel axis does not split the batch (``sharding.batch`` leaves it out), every rank of the
group holds the same rows: each runs the rows of its own experts and an all-gather of the combined rows gives
every rank all of them (``replicated_rows`` set on the weights by parallel.py).

The split sizes are host integers, so the expert-parallel path is kept out of ``torch.compile``'s graph; with
plain tensors (one process) ``dispatch_experts`` is traced like any grouped GEMM. Gradients: the reverse all-to-all
carries every rank's row gradients to the expert's owner, so a local expert's gradient sums the contributions of
all ranks' tokens; the weights' gradients travel back with them.

A build's ``model_support.py`` holds a copy (the process group comes from the DTensor weights' mesh); the trainer
reads the copy's ``SENT`` (``moec.backends.torch.loader.support_module``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor

from moec.backends.torch.grouped import grouped_linear
from moec.backends.torch.phases import phase
from moec.backends.torch.snippets import clamped_glu
from moec.backends.torch.tp_support import sum_over_shards

# Since the trainer last reset it, this process's off-rank bytes, forward and backward: ``bytes`` what the
# deduplicated dispatch sent (rows there and back, the pairs' weights and their gradients, the pairs' integers),
# ``undeduplicated`` what one row per (token, choice) would have sent; ``destinations`` the most ranks a token reached.
SENT = {"bytes": 0, "undeduplicated": 0, "destinations": 0}
PAIR_INTS = 2  # a pair's local expert and the place of its row in the message (int32 each)


def local_ffn(rows: Tensor, group_sizes: Tensor, w_in: Tensor, w_down: Tensor, fn: str, biases: tuple = (),
              clamp: tuple[float, float] | None = None) -> Tensor:
    """down(fn(gate(x)) * up(x)) (gate and up from one grouped GEMM with ``w_gate_up`` [E, 2, H, D]), or
    down(fn(up(x))), per expert group of consecutive rows, with each expert's biases when given."""
    offsets = torch.cumsum(group_sizes, 0).to(torch.int32)
    b_in, b_down = _row_biases(biases, group_sizes, rows.shape[0])
    gated = w_in.ndim == 4
    projected = grouped_linear(rows, w_in.flatten(1, 2) if gated else w_in, offsets) + b_in  # (M, 2H) gate | up, or (M, H)
    if not gated:
        hidden = getattr(F, fn)(projected)
    elif fn == "clamped_glu":
        hidden = clamped_glu(*projected.chunk(2, dim=-1), *clamp)
    else:
        gate, up = projected.chunk(2, dim=-1)
        hidden = getattr(F, fn)(gate) * up
    return grouped_linear(hidden, w_down, offsets) + b_down


def _row_biases(biases: tuple, group_sizes: Tensor, rows: int) -> tuple:
    """Each row's expert's (b_gate_up or b_up, b_down) rows, [E, 2, H] flattened to [E, 2H]; zeros (added as 0)
    without biases."""
    if not biases:
        return 0, 0
    expert = torch.repeat_interleave(torch.arange(len(group_sizes), device=group_sizes.device), group_sizes, output_size=rows)
    return tuple(bias.flatten(1)[expert] for bias in biases)


def expert_group(weight) -> tuple:
    """The expert-parallel process group and its size: the mesh dim where the [E, ...] weight is
    sharded on dim 0 (under FSDP the unsharded weight also has the FSDP dims, replicated; under tensor
    parallelism the tp dim, which splits each expert's hidden size)."""
    mesh = weight.device_mesh
    (dim,) = [i for i, placement in enumerate(weight.placements) if placement.is_shard(0)]
    return mesh.get_group(dim), mesh.size(dim)


def dispatch_experts(x: Tensor, chosen: Tensor, weights: Tensor, w_in: Tensor, w_down: Tensor, fn: str, biases: tuple = (),
                     clamp: tuple[float, float] | None = None) -> Tensor:
    """(N, D): each token's routed experts' outputs, weighted and summed in choice order."""
    ffn = functools.partial(local_ffn, fn=fn, biases=biases, clamp=clamp)
    if not isinstance(w_in, DTensor):  # one process: traced by torch.compile like any grouped GEMM, no graph break
        return _combine(_choice_outputs(x, chosen, ffn, w_in, w_down), weights)
    return _expert_parallel(x, chosen, weights, w_in, w_down, ffn)


def _choice_outputs(x: Tensor, chosen: Tensor, ffn, w_in: Tensor, w_down: Tensor) -> Tensor:
    """(N, k, D): the expert output of each (token, choice), every expert local."""
    tokens, k = chosen.shape
    flat_expert = chosen.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)  # sort-by-expert permutation
    counts = torch.zeros(w_in.shape[0], dtype=torch.int64, device=x.device).scatter_add_(0, flat_expert, torch.ones_like(flat_expert))
    y_sorted = ffn(x[order // k], counts, w_in, w_down)
    return torch.empty_like(y_sorted).index_copy(0, order, y_sorted).view(tokens, k, -1)


def _combine(y: Tensor, weights: Tensor) -> Tensor:
    """(N, k, D) outputs weighted by (N, k) and summed over the choices in order."""
    out = weights[:, 0, None] * y[:, 0]
    for j in range(1, y.shape[1]):
        out = out + weights[:, j, None] * y[:, j]
    return out


def _local(ffn: functools.partial) -> functools.partial:
    """``ffn`` (``local_ffn`` with the layer's activation and biases) with this rank's rows of the expert
    biases (DTensors sharded like the weights)."""
    biases = tuple(bias.to_local() if isinstance(bias, DTensor) else bias for bias in ffn.keywords["biases"])
    return functools.partial(ffn, biases=biases)


@dataclass(frozen=True)
class Dispatch:
    """Where a rank's tokens go: one row per (token, destination rank), one pair per (token, choice)."""

    row_token: Tensor  # (R,) the token of each row; rows by destination rank, then token
    row_place: Tensor  # (R,) the row's place among its token's destinations (where it lands on the way back)
    row_sizes: list[int]  # rows to each rank
    pair_order: Tensor  # (N*k,) the (token, choice) pairs by destination rank, then token, then choice
    pair_ints: Tensor  # (N*k, 2) int32, in pair order: the local expert, the row's place in its message
    pair_sizes: list[int]  # pairs to each rank
    destinations: int  # the most ranks one token reaches


def plan_dispatch(rank_of: Tensor, local_of: Tensor, ranks: int) -> Dispatch:
    """``rank_of`` / ``local_of`` (N, k): the rank holding each choice's expert, and that expert's row there."""
    k = rank_of.shape[1]
    reaches = torch.zeros(rank_of.shape[0], ranks, dtype=torch.bool, device=rank_of.device).scatter_(1, rank_of, True)  # (N, P)
    row_rank, row_token = reaches.t().nonzero(as_tuple=True)  # (R,): a token routed twice to one rank is one row
    place_in_message = reaches.t().cumsum(1) - 1  # (P, N) where token n's row is in the message to rank p
    place_among = reaches.cumsum(1) - 1  # (N, P) where rank p is among token n's destinations
    flat_rank = rank_of.reshape(-1)
    pair_order = torch.argsort(flat_rank, stable=True)
    pair_rank, pair_token = flat_rank[pair_order], pair_order // k
    pair_ints = torch.stack([local_of.reshape(-1)[pair_order], place_in_message[pair_rank, pair_token]], 1).to(torch.int32)
    return Dispatch(row_token, place_among[row_token, row_rank], reaches.sum(0).tolist(), pair_order, pair_ints,
                    torch.bincount(flat_rank, minlength=ranks).tolist(), int(reaches.sum(1).max()))


def sum_into(values: Tensor, row_of: Tensor, place: Tensor, rows: int, width: int) -> Tensor:
    """(rows, D): value i put at slot ``place[i]`` of row ``row_of[i]`` (each slot once), the slots summed in a
    fixed order (deterministic: no atomic scatter-add)."""
    slots = values.new_zeros(rows, width, *values.shape[1:]).index_put((row_of, place), values)
    return slots.sum(1)


def run_rows(rows: Tensor, row_of_pair: Tensor, local_expert: Tensor, pair_weights: Tensor, ffn, w_in: Tensor,
             w_down: Tensor) -> Tensor:
    """One row per received row: its pairs' local experts run (grouped GEMMs, pairs sorted by expert), their
    outputs weighted and summed. ``row_of_pair`` is nondecreasing: a row's pairs arrive together, in choice order."""
    local = [w.to_local() for w in (w_in, w_down)]
    order = torch.argsort(local_expert, stable=True)
    counts = torch.bincount(local_expert, minlength=local[0].shape[0])
    y_sorted = _local(ffn)(rows[row_of_pair[order]], counts, *local)
    y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)  # back to pair order
    if any(p.is_shard(w_down.ndim - 1) for p in w_down.placements):  # tp splits each expert's hidden size too
        y = sum_over_shards(y, w_down)  # partial sums added before the router's weights combine them
    per_row = torch.bincount(row_of_pair, minlength=rows.shape[0])
    place = torch.arange(len(row_of_pair), device=rows.device) - (torch.cumsum(per_row, 0) - per_row)[row_of_pair]
    width = int(per_row.max()) if len(per_row) else 0
    return sum_into(pair_weights[:, None] * y, row_of_pair, place, rows.shape[0], width)


@torch.compiler.disable
def _expert_parallel(x: Tensor, chosen: Tensor, weights: Tensor, w_in: Tensor, w_down: Tensor, ffn) -> Tensor:
    """The deduplicated dispatch: plan the rows, send them (or take this rank's), run and combine, sum per token."""
    group, ranks = expert_group(w_in)
    per_rank = w_in.shape[0] // ranks
    row = _weight_row(chosen, getattr(w_in, "expert_order", None))
    plan = plan_dispatch(row // per_rank, row % per_rank, ranks)
    replicated = getattr(w_in, "replicated_rows", False)  # every rank of the group holds the same tokens
    _count(plan, x, weights, dist.get_rank(group), replicated)
    run = functools.partial(run_rows, ffn=ffn, w_in=w_in, w_down=w_down)
    back = (_split_replicated if replicated else _exchange)(x, weights, plan, run, group)  # (R, D) in row order
    return sum_into(back, plan.row_token, plan.row_place, x.shape[0], plan.destinations)


def _weight_row(chosen: Tensor, order) -> Tensor:
    """The weight row of each chosen expert: its id, or (placement consistent_hash) its place in ``order``, the
    expert in each weight row."""
    if order is None:
        return chosen
    expert_at = torch.tensor(order, device=chosen.device)
    return torch.empty_like(expert_at).index_copy_(0, expert_at, torch.arange(len(order), device=chosen.device))[chosen]


def _exchange(x: Tensor, weights: Tensor, plan: Dispatch, run, group) -> Tensor:
    """Rows and pairs to their ranks, the combined rows back, in the order they left."""
    sizes = torch.tensor([plan.row_sizes, plan.pair_sizes], device=x.device).t().contiguous()  # (P, 2) to each rank
    received = torch.empty_like(sizes)
    dist.all_to_all_single(received, sizes, group=group)  # (P, 2) rows and pairs from each rank
    rows_in, pairs_in = received[:, 0].tolist(), received[:, 1].tolist()
    with phase("moe.all_to_all"):
        rows = funcol.all_to_all_single_autograd(x[plan.row_token], rows_in, plan.row_sizes, group)  # the reverse in backward
        pair_weights = funcol.all_to_all_single_autograd(weights.reshape(-1)[plan.pair_order], pairs_in, plan.pair_sizes, group)
        ints = plan.pair_ints.new_empty(sum(pairs_in), plan.pair_ints.shape[1])
        dist.all_to_all_single(ints, plan.pair_ints, pairs_in, plan.pair_sizes, group=group)
    first_row = received.new_tensor([sum(rows_in[:source]) for source in range(len(rows_in))])  # of each source's message
    row_of_pair = ints[:, 1].long() + first_row.repeat_interleave(received[:, 1])
    with phase("moe.experts"):
        combined = run(rows, row_of_pair, ints[:, 0].long(), pair_weights)
    with phase("moe.all_to_all"):
        return funcol.all_to_all_single_autograd(combined, plan.row_sizes, rows_in, group)


def _split_replicated(x: Tensor, weights: Tensor, plan: Dispatch, run, group) -> Tensor:
    """Every rank holds the same tokens (ep is not a batch axis): each runs the rows of its own experts, then an
    all-gather gives every rank all the combined rows. Backward mirrors it: a rank's rows and weights get their
    gradient from the rank that ran them (each rank's gradient of the output is the same)."""
    mine = _RowsOfRank.apply(x[plan.row_token], plan.row_sizes, group)
    my_weights = _RowsOfRank.apply(weights.reshape(-1)[plan.pair_order], plan.pair_sizes, group)
    ints = plan.pair_ints[_own_rows(plan.pair_sizes, group)]
    with phase("moe.experts"):
        combined = run(mine, ints[:, 1].long(), ints[:, 0].long(), my_weights)
    return _GatherRows.apply(combined, plan.row_sizes, group)


def _count(plan: Dispatch, x: Tensor, weights: Tensor, me: int, replicated: bool) -> None:
    """SENT, forward and backward: rows (and their gradients) there and back; the pairs' weights there (their
    gradients back) and integers there; against one row per (token, choice) there and back."""
    row_bytes = x.shape[1] * x.element_size()
    pair_bytes = 2 * weights.element_size() + PAIR_INTS * 4
    if replicated:  # nothing travels to the experts; my combined rows go to every other rank, their gradients come back
        others = len(plan.row_sizes) - 1
        rows, pairs = others * plan.row_sizes[me], others * plan.pair_sizes[me]
        SENT["bytes"] += 2 * rows * row_bytes + pairs * weights.element_size()
        SENT["undeduplicated"] += 2 * pairs * row_bytes
    else:  # my rows and pairs that leave this rank
        rows, pairs = sum(plan.row_sizes) - plan.row_sizes[me], sum(plan.pair_sizes) - plan.pair_sizes[me]
        SENT["bytes"] += 4 * rows * row_bytes + pairs * pair_bytes
        SENT["undeduplicated"] += 4 * pairs * row_bytes
    SENT["destinations"] = max(SENT["destinations"], plan.destinations)


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
