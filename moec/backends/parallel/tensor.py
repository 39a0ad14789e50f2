"""Tensor parallelism in the generated ``parallel.py``: which weights split, and the code that splits them.

``tensor_splits`` reads the placements ``annotate_sharding`` gave the parameters on the
tensor-parallel axis: ``Shard(0)`` for column groups (``Shard(1)`` for the experts' [E, out, in]
weights), ``Shard(1)`` for row groups (experts ``Shard(2)``). ``parallel.py``'s
``tensor_parallel(model, mesh)`` turns each of them into a DTensor on the tp mesh, from the whole
weight every rank initialised from the spec seed, so the shards are the one-process weights.
Gradients come back as DTensors with the same placement, checkpoints save them as DTensors (DCP
reshards them for any mesh) and the memory plan counts their local shards. Everything else stays
whole on every tp rank: without sequence parallelism its gradient is the same on each of them.
The vocabulary splits like a column group (``embed``, ``head``: ``Shard(0)`` of the [V, D] tables);
``VOCAB_PARALLEL`` in ``parallel.py`` names the axis the head's logits stay split over.
That includes the k / v projections of an attention layer with fewer KV heads than tp ranks
(``moec.passes.sharding.replicated_kv`` leaves them ``Replicate()``): ``model.py`` reads each
rank's KV head through ``tensor_parallel.kv_shard``, whose backward sums the gradient over tp.
"""

from __future__ import annotations

from moec.ir.graph import Graph
from moec.ir.names import split_block_name
from moec.passes.sharding import tp_group


def tensor_axis(spec) -> str | None:
    """The tensor-parallel axis when it is larger than 1."""
    tensor = spec.sharding.tensor
    return tensor.axis if tensor is not None and spec.mesh.axes.get(tensor.axis, 1) > 1 else None


def vocab_parallel_output(spec) -> bool:
    """The head's logits stay split along the vocabulary (``head`` in ``sharding.tensor.column``, or ``embed``
    with tied embeddings): the loss reduces over tp (``moec.backends.torch.tensor_parallel.cross_entropy``)."""
    if tensor_axis(spec) is None or spec.model.head.kind != "lm":
        return False
    column = spec.sharding.tensor.column
    return "head" in column or (spec.model.head.tie_embeddings and "embed" in column)


def tensor_splits(spec, graph: Graph) -> dict[str, int]:
    """Parameter name -> the dim it is split on over the tensor-parallel axis (empty without one)."""
    axis = tensor_axis(spec)
    if axis is None:
        return {}
    index = list(spec.mesh.axes).index(axis)
    splits = {}
    for node in graph.params():
        placement = dict(node.meta).get("placement")
        if node.attr["name"] in _moe_inputs(graph) and tp_group(node.attr["name"]) not in ("experts.up", "experts.down"):
            continue  # a shared expert or dense fallback inside a fused MoE ("w_up" reads as mlp.up): stays whole
        if placement is not None and placement[index].startswith("Shard"):
            splits[node.attr["name"]] = int(placement[index][6:-1])
    return splits


def _moe_inputs(graph: Graph) -> set[str]:
    """The names of the parameters the fused MoE nodes read."""
    return {graph[ref.node].attr["name"] for node in graph.nodes if node.op in ("moe", "spectral_moe")
            for ref in node.inputs if graph[ref.node].op == "param"}


def split_kind(name: str, dim: int) -> str:
    """``column`` (output features) or ``row`` (input features) for a weight split on ``dim``."""
    return "column" if dim == (1 if ".experts." in name else 0) else "row"


def split_source() -> list[str]:
    return [
        "def split(module: torch.nn.Module, dims: dict[str, int], tp_mesh: DeviceMesh) -> None:",
        '    """Each named weight becomes a DTensor sharded on its dim over tp. Every rank initialised the whole',
        '    weight from the spec seed first, so the shards are exactly the one-process weights."""',
        "    for name, dim in dims.items():",
        "        param = getattr(module, name)",
        "        sharded = distribute_tensor(param.detach(), tp_mesh, [Shard(dim)])",
        "        module.register_parameter(name, torch.nn.Parameter(sharded, requires_grad=param.requires_grad))",
    ]


def tensor_parallel_source(spec, splits: dict[str, int], where, replicated_kv: dict[str, int] | None = None) -> list[str]:
    """``def tensor_parallel(model, mesh)``: one ``split`` line per module, with its groups and spec line, and
    a comment per module whose k / v projections stay whole (``replicated_kv``: name -> kv_heads)."""
    axis = tensor_axis(spec)
    lines = [
        "def tensor_parallel(model: torch.nn.Module, mesh: DeviceMesh) -> None:",
        f'    """Megatron-style tensor parallelism over {axis}: column groups split their output features,',
        "    row groups their input features; model.py reads the local shards and all-reduces at the ends",
        '    of each group (moec.backends.torch.tensor_parallel)."""',
        f"    tp_mesh = mesh[{axis!r}]  {where('sharding', 'tensor', 'axis')}",
        "    set_tensor_group(tp_mesh.get_group())  # model.py's f and g all-reduce over it",
    ]
    modules: dict[str, dict[str, int]] = {}
    for name, dim in splits.items():
        owner, leaf = name.rsplit(".", 1)
        modules.setdefault(owner, {})[leaf] = dim
    per_block = _same_in_every_block(modules, replicated_kv or {})
    if per_block is not None:  # one plan for every block: a loop, as torchtitan's parallelize_module calls
        lines.append("    for block in model.blocks:")
        for relative, dims in per_block.items():
            lines += ["    " + line for line in _split_lines(spec, f"blocks.0.{relative}", dims, where, replicated_kv, "block")]
        modules = {owner: dims for owner, dims in modules.items() if split_block_name(owner) is None}
    for owner, dims in modules.items():
        lines += _split_lines(spec, owner, dims, where, replicated_kv)
    return lines


def _same_in_every_block(modules: dict[str, dict[str, int]], replicated_kv: dict[str, int]) -> dict[str, dict[str, int]] | None:
    """Block-relative owner -> its split dims, when every block splits the same weights the same way (else None)."""
    per_block: dict[int, dict[str, dict[str, int]]] = {}
    for owner, dims in modules.items():
        found = split_block_name(owner)
        if found is not None:
            per_block.setdefault(found[0], {})[found[1]] = dims
    whole = {}
    for name in replicated_kv:
        found = split_block_name(name)
        whole.setdefault(found[0] if found else None, set()).add(found[1] if found else name)
    rows = list(per_block.values())
    kept = list(whole.values())
    if not rows or sorted(per_block) != list(range(len(rows))) or any(row != rows[0] for row in rows) \
            or any(k != kept[0] for k in kept) or None in whole:
        return None
    return rows[0]


def _split_lines(spec, owner: str, dims: dict[str, int], where, replicated_kv, root: str = "model") -> list[str]:
    """``split(<owner>, dims, tp_mesh)`` with its groups and spec line (``root`` 'block': relative to a block)."""
    from moec.backends.torch.blocks import attribute_expr

    groups = {}
    for leaf, dim in dims.items():
        groups.setdefault(tp_group(f"{owner}.{leaf}"), split_kind(f"{owner}.{leaf}", dim))
    what = ", ".join(f"{group} {kind}" for group, kind in groups.items())
    field = "column" if "column" in groups.values() else "row"
    target = attribute_expr(owner.split(".", 2)[2], "block") if root == "block" else attribute_expr(owner, "model")
    return [f"    split({target}, {dims!r}, tp_mesh)  # {what}  {where('sharding', 'tensor', field)[2:]}",
            *_whole_kv_comment(spec, owner, replicated_kv or {}, where, target)]


def _whole_kv_comment(spec, owner: str, replicated_kv: dict[str, int], where, target: str) -> list[str]:
    """The comment saying which of ``owner``'s k / v projections stay whole, and why."""
    leaves = [name.rsplit(".", 1)[1] for name in replicated_kv if name.rsplit(".", 1)[0] == owner]
    if not leaves:
        return []
    kv_heads, tp = replicated_kv[f"{owner}.{leaves[0]}"], spec.mesh.axes[spec.sharding.tensor.axis]
    heads = f"{kv_heads} KV head{'s' if kv_heads > 1 else ''}"
    return [(f"    # {target} {', '.join(leaves)} stay whole ({heads} for {tp} ranks): each rank reads "
             f"the KV head of its query heads (tensor_parallel.kv_shard)  {where('sharding', 'tensor', 'column')[2:]}")]


def reduce_gradients_lines(axis: str, sequence_parallel: bool, data_parallel: str | None, names: str) -> list[str]:
    """The body of ``reduce_gradients`` under tensor parallelism without FSDP, or with sequence parallelism."""
    lines = ['    """' + ("Sequence parallel: each tp rank ran the blocks' norms on its S / tp positions, so the "
                          "gradients of\n    the blocks' whole weights are partial sums: summed over tp. " if sequence_parallel else "")
             + ("Averaged over the data-parallel\n    ranks, tp shards and whole weights alike. " if data_parallel else "")
             + "One flat all-reduce per bucket, in\n    model.parameters() order, the same on every rank.\"\"\""]
    if sequence_parallel:
        lines += [
            "    partial = [p.grad for p in model.blocks.parameters() if p.grad is not None and not hasattr(p, 'to_local')]",
            f"    all_reduce_flat(partial, mesh[{axis!r}].get_group())  # sum over {axis}",
        ]
    if data_parallel:
        lines += [
            "    grads = [param.grad for param in model.parameters() if param.grad is not None]",
            f"    data_parallel = {data_parallel}.get_group()  # {names}",
            "    all_reduce_flat([g.to_local() if hasattr(g, 'to_local') else g for g in grads], data_parallel, op=dist.ReduceOp.AVG)",
        ]
    return lines
