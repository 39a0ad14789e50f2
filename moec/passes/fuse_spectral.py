"""``fuse_spectral``: rfft -> (z + moe(z)) x L with shared weights -> irfft -> one ``spectral_moe`` node.

Runs after ``fuse_moe``. Starting from each ``irfft``, it walks the residual chain back to
the ``rfft``; every step must be a ``moe`` with the same weights and attributes, whose router
input is the step's value, optionally with the band features (``band_embed`` /
``band_index``) added. The steps' aux losses, summed, become the fused node's second output.
"""

from __future__ import annotations

from moec.ir.graph import Graph, Node, Ref, freeze
from moec.moe.params import BAND_TABLE
from moec.passes.rewrite import fresh_names, only_used_inside, replace_subgraphs


def fuse_spectral(graph: Graph) -> tuple[Graph, bool]:
    matches = [(irfft, _match(graph, irfft)) for irfft in graph.nodes if irfft.op == "irfft"]
    names = fresh_names(graph)
    replacements = [_replacement(graph, names.fresh("spectral_moe"), irfft, *found) for irfft, found in matches if found is not None]
    return (replace_subgraphs(graph, replacements), True) if replacements else (graph, False)


def _match(graph: Graph, irfft: Node):
    to_complex = graph[irfft.inputs[0].node]
    if to_complex.op != "real_to_complex":
        return None
    absorbed = {irfft.name, to_complex.name}
    steps: list[Node] = []
    z = graph[to_complex.inputs[0].node]
    residual = z.op == "add"
    while residual and z.op == "add" and graph[z.inputs[1].node].op == "moe":
        moe = graph[z.inputs[1].node]
        if moe.inputs[0] != z.inputs[0] or z.inputs[1].index != 0:
            return None
        steps.append(moe)
        absorbed |= {z.name, moe.name}
        z = graph[z.inputs[0].node]
    chain = to_complex.inputs[0]
    while not residual and z.op == "moe" and chain.index == 0:  # residual: false, each step z = moe(z)
        steps.append(z)
        absorbed.add(z.name)
        chain = z.inputs[0]
        z = graph[chain.node]
    if not steps or z.op != "complex_to_real" or graph[z.inputs[0].node].op != "rfft":
        return None
    rfft = graph[z.inputs[0].node]
    absorbed |= {z.name, rfft.name}
    steps.reverse()
    band = _band(graph, steps, absorbed)
    if band is None or not _same_weights(steps):
        return None
    aux_root = _aux_chain(graph, steps, absorbed)
    if aux_root is None or not only_used_inside(graph, absorbed, {irfft.name, aux_root}):
        return None
    return rfft, steps, band, aux_root, absorbed, residual


def _band(graph: Graph, steps: list[Node], absorbed: set[str]) -> tuple[str, Ref | None] | None:
    """How each step's router input derives from the step's value: ('none'|'embedding'|'index_feature', table)."""
    kinds, tables = set(), set()
    for moe in steps:
        router_in = moe.inputs[1]
        if router_in == moe.inputs[0]:
            kinds.add("none")
            continue
        node = graph[router_in.node]
        if node.op not in ("band_embed", "band_index") or node.inputs[0] != moe.inputs[0]:
            return None
        kinds.add("embedding" if node.op == "band_embed" else "index_feature")
        if node.op == "band_embed":
            tables.add(node.inputs[1])
        absorbed.add(node.name)
    if len(kinds) != 1 or len(tables) > 1:
        return None
    return kinds.pop(), (tables.pop() if tables else None)


def _same_weights(steps: list[Node]) -> bool:
    first = steps[0]
    return all(s.inputs[2:] == first.inputs[2:] and s.attrs == first.attrs for s in steps[1:])


def _aux_chain(graph: Graph, steps: list[Node], absorbed: set[str]) -> str | None:
    """The ``add`` chain that sums the steps' aux outputs; returns its last node."""
    total = Ref(steps[0].name, 1)
    for moe in steps[1:]:
        users = [graph[u] for u in graph.users[total.node] if u != "<output>" and graph[u].op == "add"]
        adds = [a for a in users if set(a.inputs) == {total, Ref(moe.name, 1)}]
        if len(adds) != 1:
            return None
        absorbed.add(adds[0].name)
        total = adds[0].out()
    return total.node


def _replacement(graph: Graph, name: str, irfft: Node, rfft: Node, steps: list[Node], band, aux_root: str,
                 absorbed: set[str], residual: bool):
    kind, table = band
    moe = steps[0]
    slots = ["x"] + ([BAND_TABLE] if table is not None else []) + list(moe.attr["slots"][2:])
    inputs = [rfft.inputs[0]] + ([table] if table is not None else []) + list(moe.inputs[2:])
    moe_attrs = {key: value for key, value in moe.attrs if key != "slots"}
    attrs = {"slots": tuple(slots), "depth": len(steps), "fft_norm": rfft.attr["norm"], "band": kind, **moe_attrs}
    attrs |= {} if residual else {"residual": False}  # only when off: today's graphs and their printed IR are unchanged
    node = Node(name=name, op="spectral_moe", inputs=tuple(inputs), attrs=freeze(attrs), origin=irfft.origin)
    aux_ref = Ref(aux_root) if aux_root != steps[0].name else Ref(aux_root, 1)  # depth 1: the moe's aux output
    if graph.typed:
        node = node.with_(types=(irfft.types[0], graph.type_of(aux_ref)))
    mapping = {irfft.out(): Ref(name, 0), aux_ref: Ref(name, 1)}
    return absorbed, node, mapping
