"""What a tensor-parallel program needs beyond torch's ColwiseParallel / RowwiseParallel.

The generated ``parallel.py`` splits attention and MLP projections, the vocabulary and the norms
(sequence parallelism) with torch's own plans (``parallelize_module``). Three things have no torch
plan, and ``model_support.py`` gets these helpers for them (copied from here, after the imports):

- the experts' hidden size split over tp (Megatron's expert layout): the stacked [E, out, in] expert
  weights are DTensors sharded by ``parallel.py``; the MoE layer reads its shards (``local``), enters
  the expert GEMMs through Megatron's *f* (``copy_to_shards``) and leaves through *g*
  (``sum_over_shards``) before the router's weights combine the experts' outputs;
- a head tied to a vocabulary-split embedding: the head reads the embedding's rows (``local``) after *f*;
- a k / v projection of an attention layer with fewer KV heads than tp ranks (``ReplicatedKvHead``, a
  ``ParallelStyle``): the weight stays whole on every rank and each rank keeps the KV head its query heads
  read.

Each helper finds its process group in the DTensor weight it concerns (its ``device_mesh``), or is
given the mesh by ``parallelize_module``: no module globals. On plain tensors (one process) each is
the identity, so the same model.py runs whole.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


def local(weight: Tensor) -> Tensor:
    """This rank's shard of a weight ``parallel.py`` split (a DTensor); a plain weight as it is."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


def _over_features(weight: DTensor, split: Placement) -> list[Placement]:
    """``split`` on the mesh dims that split ``weight``'s features (its last two dims), Replicate on the others
    (an expert-parallel dim that splits the stacked experts, dim 0 of [E, out, in])."""
    features = (weight.ndim - 2, weight.ndim - 1)
    return [split if isinstance(p, Shard) and p.dim % weight.ndim in features else Replicate() for p in weight.placements]


def copy_to_shards(x: Tensor, weight: Tensor) -> Tensor:
    """Megatron's f before a product with this rank's shard of ``weight`` (split along its output features):
    identity forward; backward sums the gradient over the ranks that split ``weight``'s features."""
    if not isinstance(weight, DTensor):
        return x
    whole = DTensor.from_local(x, weight.device_mesh, [Replicate()] * weight.device_mesh.ndim, run_check=False)
    return whole.to_local(grad_placements=_over_features(weight, Partial()))


def sum_over_shards(y: Tensor, weight: Tensor) -> Tensor:
    """Megatron's g after a product with this rank's shard of ``weight`` (split along its input features): the
    partial sums of the ranks that split ``weight``'s features added up (all-reduce); identity backward."""
    if not isinstance(weight, DTensor):
        return y
    partial = DTensor.from_local(y, weight.device_mesh, _over_features(weight, Partial()), run_check=False)
    return partial.redistribute(weight.device_mesh, [Replicate()] * weight.device_mesh.ndim).to_local()


def kv_head_of(rank: int, ranks: int, kv_heads: int) -> int:
    """The KV head tensor-parallel ``rank`` of ``ranks`` reads when ``ranks`` is a multiple of ``kv_heads``."""
    return rank * kv_heads // ranks


class _OwnKvHead(torch.autograd.Function):
    """The columns of this rank's KV head of a whole k / v projection [..., kv_heads * head_dim]. Query heads split
    evenly over tp and head h reads KV head h // (heads / kv_heads), so rank r's heads all read KV head
    r // (tp / kv_heads). Backward: the slice's gradient in place in a zero whole-width gradient, summed over the
    ranks, so every rank's whole weight (and input) gets the gradient of all the query heads."""

    @staticmethod
    def forward(ctx, projection: Tensor, kv_heads: int, group) -> Tensor:
        width = projection.shape[-1] // kv_heads
        head = kv_head_of(dist.get_rank(group), dist.get_world_size(group), kv_heads)
        ctx.group, ctx.pad = group, (head * width, projection.shape[-1] - (head + 1) * width)
        return projection.narrow(-1, head * width, width).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        whole = funcol.all_reduce(F.pad(grad, ctx.pad).contiguous(), "sum", ctx.group)
        return (whole.wait() if isinstance(whole, funcol.AsyncCollectiveTensor) else whole), None, None


class ReplicatedKvHead(ParallelStyle):
    """A k / v projection (``nn.Linear``) of a layer with ``kv_heads`` < tp: whole on every rank, each rank keeps
    the KV head of its query heads (tp must be a multiple of kv_heads)."""

    def __init__(self, kv_heads: int) -> None:
        super().__init__()
        self.kv_heads = kv_heads

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group, kv_heads = device_mesh.get_group(), self.kv_heads
        module.register_forward_hook(lambda _module, _inputs, output: _OwnKvHead.apply(output, kv_heads, group))
        return module


class ExpertHiddenSplit(ParallelStyle):
    """Stacked expert weights [E, out, in] split along each expert's hidden size (Megatron's expert layout): ``dims``
    names each weight's split dim (up: 1, its output features; a gated expert's gate + up [E, 2, H, D]: 2, so each
    rank keeps the same rows of both halves and applies the GLU on its own; down: 2, its input features). The MoE
    layer reads its slices (``local``) between ``copy_to_shards`` and ``sum_over_shards``."""

    def __init__(self, dims: dict[str, int]) -> None:
        super().__init__()
        self.dims = dims

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, dim in self.dims.items():
            param = getattr(module, name)
            sharded = distribute_tensor(param.detach(), device_mesh, [Shard(dim)])
            module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        return module
