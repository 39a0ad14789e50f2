"""``dce`` (drop nodes that reach no output) and ``cse`` (merge identical pure nodes)."""

from __future__ import annotations

from moec.ir.graph import Graph, Ref, renamed_inputs

# Ops whose result is not a function of inputs and attributes alone.
_IMPURE = {"param", "input", "noise"}


def dce(graph: Graph) -> tuple[Graph, bool]:
    live = {ref.node for ref in graph.outputs}
    for node in reversed(graph.nodes):
        if node.name in live:
            live.update(ref.node for ref in node.inputs)
    kept = [node for node in graph.nodes if node.name in live]
    return (graph.with_nodes(kept), True) if len(kept) != len(graph.nodes) else (graph, False)


def cse(graph: Graph) -> tuple[Graph, bool]:
    seen: dict[tuple, str] = {}
    mapping: dict[Ref, Ref] = {}
    nodes = []
    for node in graph.nodes:
        node = renamed_inputs(node, mapping)
        key = (node.op, node.inputs, node.attrs)
        if node.op not in _IMPURE and key in seen:
            for index in range(len(node.types or (None,))):
                mapping[Ref(node.name, index)] = Ref(seen[key], index)
            continue
        seen.setdefault(key, node.name)
        nodes.append(node)
    if not mapping:
        return graph, False
    outputs = tuple(mapping.get(ref, ref) for ref in graph.outputs)
    return graph.with_nodes(nodes, outputs=outputs), True
