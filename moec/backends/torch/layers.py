"""The layers inside a block of the fused graph: which nodes make up ``blocks.3.attention``.

A block of the spec is a sequence of layers, each ``norm -> layer -> residual add`` (pre-norm),
``layer -> add -> norm`` (post-norm), or a dynamics layer that updates the residual stream
itself. The norms and residual adds belong to the block (torchtitan's ``attention_norm`` beside
``attention``); the nodes in between, whose parameters live under ``blocks.<i>.<name>.``, are
the layer's body and become one ``nn.Module`` class with its own ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moec.ir.graph import Graph, Node, Ref

_KIND_BY_OP = (("spectral_moe", "SpectralMoE"), ("moe", "MoE"), ("attention", "Attention"), ("mla_attention", "MLA"),
               ("dynamics", "Dynamics"))


@dataclass
class LayerPart:
    name: str  # the layer's name in the spec (its attribute on the block): attention, moe, mlp, ...
    prefix: str  # its parameters' prefix: blocks.3.attention
    nodes: list[int] = field(default_factory=list)  # the body, indices into graph.nodes
    inputs: list[Ref] = field(default_factory=list)  # values from outside the body, first-use order
    outputs: list[Ref] = field(default_factory=list)  # body values read after it

    def kind(self, graph: Graph) -> str:
        """The class family: Attention, MLA, MoE, SpectralMoE, Dynamics or FeedForward."""
        ops = {graph.nodes[i].op for i in self.nodes}
        return next((kind for op, kind in _KIND_BY_OP if op in ops), "FeedForward")


def _is_block_norm(node: Node) -> bool:
    path = node.origin.path if node.origin else ()
    return len(path) == 4 and path[1] == "blocks" and path[3] == "norm"


def _layer_path(node: Node) -> tuple:
    path = node.origin.path if node.origin else ()
    return tuple(path[:5]) if len(path) >= 5 and path[1] == "blocks" and path[3] == "layers" else ()


def split_block(graph: Graph, block: int, indices: list[int]) -> list[int | LayerPart]:
    """The block's statements in order: node indices for its norms and residual adds, a LayerPart per layer."""
    prefix = f"blocks.{block}."
    owner_of_path: dict[tuple, str] = {}
    for index in indices:
        node = graph.nodes[index]
        if _is_block_norm(node) or not _layer_path(node):
            continue
        for ref in node.inputs:
            name = str(graph[ref.node].attr.get("name", "")) if graph[ref.node].op == "param" else ""
            if name.startswith(prefix):
                owner_of_path[_layer_path(node)] = name[len(prefix):].split(".")[0]
    items: list[int | LayerPart] = []
    parts: dict[str, LayerPart] = {}
    for index in indices:
        node = graph.nodes[index]
        owner = None if _is_block_norm(node) else owner_of_path.get(_layer_path(node))
        part = parts.get(owner) if owner else None
        if owner is None or (part is not None and _is_residual(graph, node, part)):
            items.append(index)
            continue
        if part is None:
            part = parts[owner] = LayerPart(owner, prefix + owner)
            items.append(part)
        assert items[-1] is part, f"blocks.{block}.{owner}: its nodes are not contiguous"
        part.nodes.append(index)
    for part in parts.values():
        _wire(graph, part)
    return items


def _is_residual(graph: Graph, node: Node, part: LayerPart) -> bool:
    """The add that closes a layer: it reads a value from outside the layer's body (the residual stream)."""
    inside = {graph.nodes[i].name for i in part.nodes}
    return node.op == "add" and len(node.origin.path) == 5 and any(ref.node not in inside for ref in node.inputs)


def _wire(graph: Graph, part: LayerPart) -> None:
    inside = {graph.nodes[i].name for i in part.nodes}
    for index in part.nodes:
        for ref in graph.nodes[index].inputs:
            if ref.node not in inside and graph[ref.node].op != "param" and ref not in part.inputs:
                part.inputs.append(ref)
    read_after = {ref for node in graph.nodes[part.nodes[-1] + 1:] for ref in node.inputs} | set(graph.outputs)
    for index in part.nodes:
        node = graph.nodes[index]
        part.outputs += [Ref(node.name, i) for i in range(len(node.types or (None,))) if Ref(node.name, i) in read_after]
