"""``annotate_sharding``: DTensor-style placements from the spec's mesh and sharding rules.

Every parameter and activation gets ``placement``: one entry per mesh axis, in mesh order,
each ``Replicate()``, ``Shard(d)`` or ``Partial()``. Nodes also get their pipeline ``stage``
when the spec pipelines, and under context parallelism the collectives they run over the cp group
(``exchange``, ``moec.passes.context_traffic``). Tensor-parallel groups follow the spec's column / row lists, except the
k / v projections of an attention layer with fewer KV heads than tensor-parallel ranks
(``replicated_kv``): they stay whole (``Replicate()``) on every tp rank, and each rank reads the
rows of the one KV head its query heads use (``moec.backends.torch.tensor_parallel.kv_shard``).
"""

from __future__ import annotations

from moec.ir.graph import Graph, Node
from moec.ir.names import block_of
from moec.layers import TP_GROUPS
from moec.layers.attention import KV_PROJECTIONS
from moec.passes.builder import origin_issue
from moec.passes.context_traffic import context_axis, exchange
from moec.passes.stages import stage_split
from moec.schema.errors import SpecError
from moec.schema.spec import Spec

def annotate_sharding(spec: Spec, graph: Graph) -> tuple[Graph, bool]:
    if spec.mesh.world_size == 1:
        return graph, False  # one device: every tensor is whole, nothing to annotate
    axes = list(spec.mesh.axes)
    stages = _stage_of(spec, graph)
    kv = replicated_kv(spec, graph)
    context = context_axis(spec)
    nodes, issues = [], []
    for node in graph.nodes:
        placement = _param_placement(spec, node, axes, issues, kv) if node.op == "param" else _activation_placement(spec, node, axes)
        meta = dict(node.meta) | {"placement": tuple(placement)}
        if context is not None and exchange(node, context[0]):
            meta["exchange"] = exchange(node, context[0])  # the collectives it runs over the cp group
        if stages is not None:
            meta["stage"] = stages[node.name]
        nodes.append(node.with_(meta=meta))
    if issues:
        raise SpecError(issues)
    new = graph.with_nodes(nodes)
    return new, new.nodes != graph.nodes


def tp_group(name: str) -> str | None:
    """The tensor-parallel group (moec.schema.parallel.TpGroup) a parameter belongs to, by its name: each layer kind
    declares its groups' weights (``moec.layers.TP_GROUPS``)."""
    return next((group for group, weights in TP_GROUPS.items() if any(w.matches(name) for w in weights)), None)


def replicated_kv(spec: Spec, graph: Graph) -> dict[str, int]:
    """The k / v projections (``wk``, ``wv``: weights and biases) of each attention layer with fewer KV heads
    than tensor-parallel ranks -> that layer's kv_heads. Validation admits it when tp is a multiple of
    kv_heads: the ranks of tp // kv_heads consecutive query-head slices share one KV head."""
    tensor = spec.sharding.tensor
    if tensor is None or "attention.qkv" not in tensor.column:
        return {}
    tp = spec.mesh.axes.get(tensor.axis, 1)
    # a layer's projections and its attention node come from the same spec path (moec.passes.lower)
    kv_heads = {node.origin.path: node.attr["kv_heads"] for node in graph.nodes
                if node.op == "attention" and node.origin is not None and node.attr["kv_heads"] < tp}
    return {node.attr["name"]: kv_heads[node.origin.path] for node in graph.params()
            if node.origin is not None and node.origin.path in kv_heads and KV_PROJECTIONS.matches(node.attr["name"])}


def _param_placement(spec: Spec, node: Node, axes: list[str], issues: list, kv: dict[str, int]) -> list[str]:
    sharding, shape = spec.sharding, node.attr["shape"]
    placement = ["Replicate()"] * len(axes)
    is_expert = ".experts." in node.attr["name"]
    for axis in sharding.experts:
        if is_expert:
            placement[axes.index(axis)] = "Shard(0)"
    tensor = sharding.tensor
    group = tp_group(node.attr["name"]) if tensor is not None else None
    if group is not None and (group in tensor.column or group in tensor.row) and node.attr["name"] not in kv:
        # torch weights are [out, in] (experts: [E, out, in]): columns split out, rows split in. A bias has the
        # out features only: split with a column group's, whole beside a row group's (added after the sum over tp).
        # Fused gate + up experts [E, 2, H, D]: their out features are dim 2 (each half split alike).
        dim = (0 if group in tensor.column else 1) + (1 if is_expert else 0) + (1 if node.attr["name"].endswith("_gate_up") else 0)
        if dim < len(shape):
            placement[axes.index(tensor.axis)] = f"Shard({dim})"
    for axis in sharding.fsdp:
        if is_expert and axis in sharding.experts:
            continue  # an ep axis that is also an FSDP axis: the experts are split over it already
        taken = {p for p in placement if p.startswith("Shard")}
        second = 2 if node.attr["name"].endswith("_gate_up") else 1  # [E, 2, H, D]: not the halves' dim
        placement[axes.index(axis)] = f"Shard({second})" if "Shard(0)" in taken and len(shape) > 1 else "Shard(0)"
    _check_divisible(spec, node, axes, placement, issues)
    return placement


def _check_divisible(spec, node, axes, placement, issues) -> None:
    shape = node.attr["shape"]
    for axis, item in zip(axes, placement):
        if not item.startswith("Shard") or axis in spec.sharding.fsdp:
            continue  # FSDP2 pads uneven shards
        dim = int(item[6:-1])
        size = spec.mesh.axes[axis]
        if shape[dim] % size:
            message = f"parameter {node.attr['name']} dim {dim} ({shape[dim]}) does not split over {axis} ({size})"
            issues.append(origin_issue(node.origin, message))


def _activation_placement(spec: Spec, node: Node, axes: list[str]) -> list[str]:
    placement = ["Replicate()"] * len(axes)
    types = node.types or ()
    if not types or types[0].rank == 0:
        # A scalar (aux loss) is a per-rank partial value until it is reduced (over the batch and sequence ranks).
        return ["Partial()" if axis in spec.sharding.batch or axis in spec.sharding.sequence else "Replicate()" for axis in axes]
    for axis in spec.sharding.batch:
        placement[axes.index(axis)] = "Shard(0)"
    for axis in spec.sharding.sequence:
        if types[0].rank >= 2 and types[0].shape[1] != 1:  # a pooled [B, 1, ...] is every rank's
            placement[axes.index(axis)] = "Shard(1)"
    return placement


def _stage_of(spec: Spec, graph: Graph) -> dict[str, int] | None:
    """Contiguous pipeline stages of blocks balanced by FLOPs (``moec.passes.stages``); the head and
    final norm on the last stage, everything else on the stage of its inputs."""
    if spec.sharding.pipeline is None:
        return None
    split = stage_split(spec, graph)
    stage_of_block = {block: stage for stage, (first, last) in enumerate(split) for block in range(first, last + 1)}
    result: dict[str, int] = {}
    for node in graph.nodes:
        block = block_of(node.attr["name"]) if node.op == "param" else None
        if block is not None:
            stage = stage_of_block[block]
        elif node.op == "param" and node.attr["name"].startswith(("head.", "final_norm.")):
            stage = len(split) - 1
        else:
            stage = max((result[ref.node] for ref in node.inputs if graph[ref.node].op != "param"), default=0)
            stage = max([stage] + [result[ref.node] for ref in node.inputs if graph[ref.node].op == "param"])
        result[node.name] = stage
    return result
