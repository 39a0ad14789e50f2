"""Tensor parallelism in the generated ``parallel.py``: which weights split, and torch's plans that split them.

``tensor_splits`` reads the placements ``annotate_sharding`` gave the parameters on the
tensor-parallel axis: ``Shard(0)`` for column groups (``Shard(1)`` for the experts' [E, out, in]
weights, ``Shard(2)`` for the gated experts' [E, 2, H, D] ``w_gate_up``: each rank keeps its slice of
the gate half and the same slice of the up half), ``Shard(1)`` for row groups (experts ``Shard(2)``). ``parallel.py``'s
``tensor_parallel(model, mesh)`` applies them with ``parallelize_module``: ``ColwiseParallel`` /
``RowwiseParallel`` for attention and MLP projections, ``RowwiseParallel`` / ``ColwiseParallel`` for
the vocabulary-split embedding and head, ``SequenceParallel`` and ``PrepareModuleInput`` for
sequence parallelism (torchtitan's plan). Two styles are moec's own (``moec.backends.torch.tp_support``,
copied into model_support.py): ``ExpertHiddenSplit`` (each expert's hidden size over tp) and
``ReplicatedKvHead`` (the k / v projections of an attention layer with fewer KV heads than tp ranks,
which ``moec.passes.sharding.replicated_kv`` leaves whole: each rank keeps its KV head).
Every rank initialised the whole weights from the spec seed first, so the shards are the
one-process weights; gradients come back as DTensors, checkpoints save them as DTensors (DCP
reshards them for any mesh) and the memory plan counts their local shards.
"""
from __future__ import annotations

import re

from moec.ir.graph import Graph
from moec.ir.names import split_block_name
from moec.passes.sharding import tp_group


def tensor_axis(spec) -> str | None:
    """The tensor-parallel axis when it is larger than 1."""
    tensor = spec.sharding.tensor
    return tensor.axis if tensor is not None and spec.mesh.axes.get(tensor.axis, 1) > 1 else None


def vocab_parallel_output(spec) -> bool:
    """The head's logits stay split along the vocabulary (``head`` in ``sharding.tensor.column``, or ``embed``
    with tied embeddings): the loss reduces over tp (``moec.train.vocab_loss.cross_entropy``)."""
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
    column = 2 if name.endswith("_gate_up") else 1 if ".experts." in name else 0  # experts [E, out, in], gate_up [E, 2, H, D]
    return "column" if dim == column else "row"


def tensor_parallel_source(spec, splits: dict[str, int], where, replicated_kv: dict[str, int] | None = None,
                           cache_input: bool = True) -> list[str]:
    """``def tensor_parallel(model, mesh)``: torch's ``parallelize_module`` with one plan for every block (a loop) or
    one per block, the vocabulary's plan on the root, and under sequence parallelism the split of the blocks'
    hidden state. ``cache_input``: attention layers take the KV cache as a second input."""
    axis, tensor = tensor_axis(spec), spec.sharding.tensor
    lines = [
        "def tensor_parallel(model: torch.nn.Module, mesh: DeviceMesh) -> None:",
        f'    """Megatron-style tensor parallelism over {axis} with torch\'s plans: column groups split their output',
        "    features (ColwiseParallel), row groups their input features (RowwiseParallel). Every rank initialised the",
        '    whole weights from the spec seed first, so the shards are exactly the one-process weights."""',
        f"    tp_mesh = mesh[{axis!r}]  {where('sharding', 'tensor', 'axis')}",
    ]
    plans = _block_plans(spec, splits, replicated_kv or {}, cache_input, where)
    same = list(plans.values())
    if same and all(plan == same[0] for plan in same) and sorted(plans) == list(range(len(plans))):
        lines += ["    for block in model.blocks:", *_indent(_parallelize("block", same[0]))]
    else:
        for block, plan in plans.items():
            lines += _parallelize(f"model.blocks[{block}]", plan)
    for depth, plan in _block_plans(spec, _mtp_block_splits(splits), _mtp_block_splits(replicated_kv or {}),
                                    cache_input, where).items():
        # head.mtp: each depth's block splits as the model's last block; enorm, hnorm, eh_proj and norm stay whole
        lines += _parallelize(f"model.mtp[{depth}].block", plan)
    root = _root_plan(spec, splits, where)
    if root:
        lines += _parallelize("model", root)
    if "embed.weight" in splits:
        lines += [
            "    # RowwiseParallel hands on the lookups' sum un-waited (an AsyncCollectiveTensor), which a compiled block",
            "    # cannot take through its backward (torch 2.13): the first block reads a plain copy",
            "    model.embed.register_forward_hook(lambda _module, _inputs, summed: summed.clone())",
        ]
    if tensor.sequence_parallel:
        lines += [
            f"    # sequence parallel: the blocks run on S / {axis} positions, the final norm and head on all of them  "
            f"{where('sharding', 'tensor', 'sequence_parallel')[2:]}",
            "    parallelize_module(model.blocks[0], tp_mesh, PrepareModuleInput(input_layouts=(Replicate(),), "
            "desired_input_layouts=(Shard(1),), use_local_output=True))",
            "    parallelize_module(model.blocks[-1], tp_mesh, PrepareModuleOutput(output_layouts=Shard(1), "
            "desired_output_layouts=Replicate()))",
        ]
    return lines


def _indent(lines: list[str]) -> list[str]:
    return ["    " + line for line in lines]


def _parallelize(target: str, plan: list[tuple[str, str, str]]) -> list[str]:
    """``parallelize_module(target, tp_mesh, {...})`` with one entry per line: (module, style, comment)."""
    lines = [f"    parallelize_module({target}, tp_mesh, {{"]
    lines += [f"        {module!r}: {style},{f'  # {comment}' if comment else ''}" for module, style, comment in plan]
    return lines + ["    })"]


_PROJECTIONS = ("wq", "wq_b", "wkv_b", "wk", "wv", "wo", "w_up", "w_gate", "w_down", "experts")  # plan entries in forward order


def _block_plans(spec, splits: dict[str, int], replicated_kv: dict[str, int], cache_input: bool, where) -> dict[int, list]:
    """Block index -> its plan entries (block-relative module, style, comment), layer by layer in forward order."""
    sequence_parallel = spec.sharding.tensor.sequence_parallel
    plans: dict[int, dict[str, dict[str, tuple[str, str]]]] = {}  # block -> layer -> module -> (style, group)
    for name in list(splits) + list(replicated_kv):
        found = split_block_name(name)
        if found is None:
            continue
        block, relative = found
        module = relative.rsplit(".", 1)[0]
        layer = module.split(".", 1)[0]
        entries = plans.setdefault(block, {}).setdefault(layer, {})
        if name in replicated_kv:
            kv_heads = replicated_kv[name]
            entries[module] = (f"ReplicatedKvHead({kv_heads})", f"{kv_heads} KV head{'s' if kv_heads > 1 else ''} for "
                               f"{_tp(spec)} ranks: whole, each rank keeps the head of its queries")
        elif ".experts." in name:
            owner = name.rsplit(".", 1)[0]
            dims = {leaf.rsplit(".", 1)[1]: dim for leaf, dim in splits.items() if leaf.rsplit(".", 1)[0] == owner}
            entries[module] = (f"ExpertHiddenSplit({dims!r})", "experts.up column, experts.down row")
        else:
            kind = split_kind(name, splits[name])
            row = "RowwiseParallel(output_layouts=Shard(1))" if sequence_parallel else "RowwiseParallel()"
            entries[module] = ("ColwiseParallel()" if kind == "column" else row, f"{tp_group(name)} {kind}")
            if sequence_parallel:
                entries.update(_sequence_parallel_entries(layer, cache_input and tp_group(name).startswith("attention")))
    return {block: _entries(plans[block], where) for block in sorted(plans)}


def _mtp_block_splits(splits: dict[str, int]) -> dict[str, int]:
    """The MTP modules' block weights renamed as blocks (``mtp.0.block.mla.wo.weight`` -> ``blocks.0.mla.wo.weight``),
    so ``_block_plans`` reads them by depth."""
    prefix = re.compile(r"mtp\.(\d+)\.block\.")
    return {prefix.sub(r"blocks.\1.", name): dim for name, dim in splits.items() if prefix.match(name)}


def _sequence_parallel_entries(layer: str, takes_cache: bool) -> dict[str, tuple[str, str]]:
    """The layer's norm on this rank's S / tp positions, and the layer's input gathered to the whole sequence."""
    inputs = "(Shard(1), None)" if takes_cache else "(Shard(1),)"
    gather = (f"PrepareModuleInput(input_layouts={inputs}, desired_input_layouts={inputs.replace('Shard(1)', 'Replicate()')}, "
              "use_local_output=True)")
    return {f"{layer}_norm": ("SequenceParallel(use_local_output=True)", "sequence parallel: norms on S / tp positions"),
            layer: (gather, "")}


def _tp(spec) -> int:
    return spec.mesh.axes[spec.sharding.tensor.axis]


def _order(module: str) -> tuple[int, int]:
    """A layer's norm, then the layer's own input plan, then its projections in forward order."""
    if module.endswith("_norm"):
        return (0, 0)
    if "." not in module:
        return (1, 0)
    leaf = module.rsplit(".", 1)[1]
    return (2, _PROJECTIONS.index(leaf) if leaf in _PROJECTIONS else len(_PROJECTIONS))


def _entries(layers: dict[str, dict[str, tuple[str, str]]], where) -> list[tuple[str, str, str]]:
    """(module, style, comment): the first module of each spec group names the group and its spec line."""
    entries, said = [], set()
    for modules in layers.values():
        for module in sorted(modules, key=_order):
            style, group = modules[module]
            comment = ""
            if group and group not in said:
                said.add(group)
                field = "sequence_parallel" if group.startswith("sequence") else "column" if "column" in group else "row"
                comment = f"{group}  {where('sharding', 'tensor', field)[2:]}"
            entries.append((module, style, comment))
    return entries


def _root_plan(spec, splits: dict[str, int], where) -> list[tuple[str, str, str]]:
    """The vocabulary split: the embedding's rows (its lookups summed over tp) and the head's columns (the logits
    stay split: the loss reduces over tp). A head tied to the embedding reads its rows in model.py."""
    entries = []
    if "embed.weight" in splits:
        entries.append(("embed", "RowwiseParallel(input_layouts=Replicate())",
                        f"vocabulary split  {where('sharding', 'tensor', 'column')[2:]}"))
    if "head.weight" in splits:
        entries.append(("head", "ColwiseParallel()", "the logits stay split along the vocabulary"))
    return entries


def match_gradient_placements_source() -> list[str]:
    return [
        "def match_gradient_placements(model: torch.nn.Module) -> None:",
        '    """torch hands some gradients back placed unlike their parameters: under sequence parallelism the norms\'',
        "    are partial sums over tp (each rank ran them on its S / tp positions), the vocabulary-split embedding's is",
        '    whole on every rank. Each goes to its parameter\'s placement (summed over tp; this rank\'s rows)."""',
        "    for param in model.parameters():",
        "        if isinstance(param.grad, DTensor) and param.grad.placements != param.placements:",
        "            param.grad = param.grad.redistribute(param.device_mesh, param.placements)",
    ]


def reduce_gradients_lines(mismatched: bool, data_parallel: str | None, names: str) -> list[str]:
    """The body of ``reduce_gradients`` under tensor parallelism without FSDP, or with gradients placed unlike their
    parameters (``mismatched``)."""
    lines = ['    """' + ("Gradients put in their parameters' placements first. " if mismatched else "")
             + ("Averaged over the data-parallel\n    ranks, tp shards and whole weights alike. " if data_parallel else "")
             + "One flat all-reduce per bucket, in\n    model.parameters() order, the same on every rank.\"\"\""]
    if mismatched:
        lines.append("    match_gradient_placements(model)")
    if data_parallel:
        lines += [
            "    grads = [param.grad for param in model.parameters() if param.grad is not None]",
            f"    data_parallel = {data_parallel}.get_group()  # {names}",
            "    all_reduce_flat([g.to_local() if hasattr(g, 'to_local') else g for g in grads], data_parallel, op=dist.ReduceOp.AVG)",
        ]
    return lines
