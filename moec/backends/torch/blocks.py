"""The generated program's module structure: one ``nn.Module`` per block, called by the root.

The graph's nodes are cut into segments in order: the root's prologue (inputs, embeddings),
one segment per block (from the first node that reads a ``blocks.<i>.`` parameter to the
next block's), and the root's epilogue (final norm, head, the aux-loss sum). Each block
becomes a class ``Block<i>`` that owns its parameters and whose ``forward`` takes the
values it reads from earlier segments and returns those read later (plus the ``MoeStats``
of its MoE layers). Per-block modules are what FSDP2 shards, activation checkpointing wraps
and pipeline stages hold; the state_dict keys stay the graph's parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moec.ir.graph import Graph, Node, Ref
from moec.ir.names import block_of
from moec.moe import EXPERT_PREFIX, ROUTER_WEIGHT



@dataclass
class Segment:
    block: int | None  # None: the root's prologue or epilogue
    nodes: list[int] = field(default_factory=list)  # indices into graph.nodes (params and inputs left out)
    inputs: list[Ref] = field(default_factory=list)  # values from earlier segments, in first-use order
    outputs: list[Ref] = field(default_factory=list)  # values read by later segments or returned

    @property
    def span(self) -> range:
        return range(self.nodes[0], self.nodes[-1] + 1) if self.nodes else range(0)


def attribute_expr(dotted: str, root: str = "self") -> str:
    """``blocks.3.moe`` -> ``self.blocks[3].moe``: a module or parameter path as Python attribute access."""
    return root + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in dotted.split("."))


def segments(graph: Graph) -> list[Segment]:
    """Prologue, blocks in order, epilogue: contiguous runs of the graph's computed nodes."""
    result = [Segment(None)]
    for index, node in enumerate(graph.nodes):
        if node.op in ("param", "input"):
            continue
        blocks = {block_of(graph[ref.node].attr["name"]) for ref in node.inputs if graph[ref.node].op == "param"}
        root_params = None in blocks and any(graph[ref.node].op == "param" for ref in node.inputs)
        current = result[-1]
        target = max((b for b in blocks if b is not None), default=None)
        if target is not None and target != current.block:
            assert current.block is None or target > current.block, f"{node.name}: block {target} after {current.block}"
            result.append(Segment(target))
        elif root_params and current.block is not None:
            result.append(Segment(None))  # the epilogue starts at the first root parameter after the blocks
        result[-1].nodes.append(index)
    for segment in result:
        _wire(graph, segment)
    return [segment for segment in result if segment.nodes]


def _wire(graph: Graph, segment: Segment) -> None:
    inside = {graph.nodes[i].name for i in segment.nodes}
    later_reads = {ref for i, node in enumerate(graph.nodes) if i > segment.nodes[-1] for ref in node.inputs} if segment.nodes else set()
    later_reads |= set(graph.outputs)
    for i in segment.nodes:
        for ref in graph.nodes[i].inputs:
            source = graph[ref.node]
            if ref.node not in inside and source.op != "param" and ref not in segment.inputs:
                segment.inputs.append(ref)
        for out in range(len(graph.nodes[i].types or (None,))):
            ref = Ref(graph.nodes[i].name, out)
            if ref in later_reads:
                segment.outputs.append(ref)


def is_fused(node: Node) -> bool:
    return node.op in ("moe", "spectral_moe")


def moe_layers(graph: Graph) -> tuple[str, ...]:
    """Names of the MoE layers, in forward order: the prefix of each one's router (or first expert) weight."""
    names = []
    for node in graph.nodes:
        if node.op in ("moe", "spectral_moe"):
            slots = node.attr["slots"]  # token_id: no router weight, the first expert weight then
            slot = ROUTER_WEIGHT if ROUTER_WEIGHT in slots else next(s for s in slots if s.startswith(EXPERT_PREFIX))
            param = node.inputs[node.attr["slots"].index(slot)]
            names.append(graph[param.node].attr["name"].removesuffix("." + slot))
    return tuple(names)
