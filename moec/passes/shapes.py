"""``infer_shapes``: give every node its output types, checking each op's inputs.

A mismatch is reported as a spec error at the spec line the node came from.
"""

from __future__ import annotations

from moec.ir.graph import Graph
from moec.ir.ops import OPS, ShapeError
from moec.passes.builder import origin_issue
from moec.schema.errors import SpecError


def infer_shapes(graph: Graph) -> tuple[Graph, bool]:
    types: dict[str, tuple] = {}
    nodes = []
    for node in graph.nodes:
        inputs = [types[ref.node][ref.index] for ref in node.inputs]
        try:
            result = tuple(OPS[node.op].rule(inputs, node.attr))
        except ShapeError as err:
            raise SpecError([origin_issue(node.origin, f"{node.op}: {err}")]) from None
        types[node.name] = result
        nodes.append(node if node.types == result else node.with_(types=result))
    changed = not graph.typed or any(a is not b for a, b in zip(nodes, graph.nodes))
    return graph.with_nodes(nodes, typed=True), changed

