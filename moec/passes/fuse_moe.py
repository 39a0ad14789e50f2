"""``fuse_moe``: each MoE's primitive subgraph -> one ``moe`` node.

Lowering marks the node that closes each MoE decomposition with its ``MoeAttrs`` (meta
``moe``) and the node of its aux loss (meta ``moe_aux``). This pass decomposes the same
attributes again, on placeholders, and walks that expected subgraph and the graph side by
side from both roots: every node must have the same op, attributes and wiring, and every
placeholder must bind to one value. Only then is the subgraph (none of whose inner values
may be read from outside) replaced by ``moe(h, router_in, *parameters)``. Fusion thus accepts
exactly what ``moec.moe.decompose`` writes, and nothing that a later change made differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moec.ir.graph import Graph, Namespace, Node, Ref, freeze
from moec.moe import MoeAttrs, decompose, moe_slots, placeholders
from moec.passes.builder import MOE_AUX_META, MOE_BALANCE_META, MOE_META
from moec.passes.rewrite import fresh_names, only_used_inside, replace_subgraphs


def fuse_moe(graph: Graph) -> tuple[Graph, bool]:
    matches = [match_moe(graph, root) for root in graph.nodes if MOE_META in root.meta_dict]
    names = fresh_names(graph)
    replacements = [_replacement(graph, match, names.fresh("moe")) for match in matches if match is not None]
    return (replace_subgraphs(graph, replacements), True) if replacements else (graph, False)


class _Expected:
    """A builder that records the decomposition without a graph (``decompose`` on placeholders)."""

    def __init__(self):
        self.nodes: dict[str, Node] = {}
        self.names = Namespace()

    def add(self, op, inputs, path, outputs=1, **attrs):
        node = Node(name=self.names.fresh(op), op=op, inputs=tuple(inputs), attrs=freeze(attrs))
        self.nodes[node.name] = node
        return node.out() if outputs == 1 else tuple(node.out(i) for i in range(outputs))

    def mark_moe(self, out, aux, attrs, balance=None) -> None:
        pass


@dataclass
class MoeMatch:
    attrs: MoeAttrs
    slots: tuple[str, ...]
    nodes: set[str] = field(default_factory=set)  # the graph nodes the fused node replaces
    bound: dict[str, Ref] = field(default_factory=dict)  # placeholder name -> graph value
    roots: tuple[str, ...] = ("", "")  # (output node, aux node[, balance statistics node])


def match_moe(graph: Graph, root: Node) -> MoeMatch | None:
    attrs = root.meta_dict[MOE_META]
    roots = (root.name, root.meta_dict[MOE_AUX_META]) + ((root.meta_dict[MOE_BALANCE_META],) if MOE_BALANCE_META in root.meta_dict else ())
    slots = ("h", "router_in") + moe_slots(attrs)
    stand_ins = placeholders(slots)
    expected = _Expected()
    wanted = decompose(expected, attrs, stand_ins["h"], stand_ins["router_in"], stand_ins)
    match = MoeMatch(attrs=attrs, slots=slots, roots=roots)
    seen: dict[str, str] = {}  # expected node -> graph node
    if len(wanted) != len(roots) or any(name not in graph.by_name for name in roots):
        return None
    if not all(_walk(expected, graph, want, Ref(name), seen, match) for want, name in zip(wanted, roots)):
        return None
    if not only_used_inside(graph, match.nodes, set(match.roots)):
        return None
    return match


def _walk(expected: _Expected, graph: Graph, want: Ref, have: Ref, seen: dict[str, str], match: MoeMatch) -> bool:
    """``have`` is the value ``want`` describes: same op, attributes and inputs, recursively."""
    if want.node not in expected.nodes:  # a placeholder: binds once, to one value
        return match.bound.setdefault(want.node, have) == have
    if want.index != have.index:
        return False
    if want.node in seen:
        return seen[want.node] == have.node
    spec, node = expected.nodes[want.node], graph[have.node]
    if node.op != spec.op or node.attrs != spec.attrs or len(node.inputs) != len(spec.inputs):
        return False
    seen[want.node] = node.name
    match.nodes.add(node.name)
    return all(_walk(expected, graph, w, h, seen, match) for w, h in zip(spec.inputs, node.inputs))


def _replacement(graph: Graph, m: MoeMatch, name: str):
    """The fused node of one match, the nodes it absorbs and where reads of the old roots now go."""
    stand_ins = placeholders(m.slots)
    inputs = tuple(m.bound[stand_ins[slot].node] for slot in m.slots)
    combine = next(graph[n] for n in sorted(m.nodes) if graph[n].op == "combine")  # the layer's own line
    node = Node(name=name, op="moe", inputs=inputs, attrs=freeze({"slots": m.slots, "moe": m.attrs}), origin=combine.origin)
    node = node.with_(types=tuple(graph[root].types[0] for root in m.roots)) if graph.typed else node
    mapping = {Ref(root): Ref(name, i) for i, root in enumerate(m.roots)}
    return m.nodes, node, mapping
