"""The verifier: run after lowering and after every pass (on by default).

Checks: names are unique; inputs are defined before use and name an existing output;
every op is in the vocabulary with the right number of inputs and exactly its attributes;
in a typed graph every node's recorded types equal what its shape rule computes; the
outputs exist; and no node is dangling (every node reaches an output).
"""

from __future__ import annotations

from moec.ir.graph import Graph, Node
from moec.ir.ops import OPS, ShapeError


class VerifyError(AssertionError):
    """A malformed graph: always a compiler bug, never a user error."""


def verify(graph: Graph) -> None:
    seen: dict[str, Node] = {}
    for node in graph.nodes:
        _check_node(node, seen, graph.typed)
        seen[node.name] = node
    if len(graph.outputs) < 2:
        raise VerifyError(f"a graph has two outputs (prediction, aux_loss), then with multi-token prediction one logits per depth and their aux loss; got {len(graph.outputs)}")
    for ref in graph.outputs:
        _check_ref(ref, seen, "graph output")
    _check_no_dangling(graph)


def _check_node(node: Node, seen: dict[str, Node], typed: bool) -> None:
    where = f"{node.name} = {node.op}(...)"
    if node.name in seen:
        raise VerifyError(f"{where}: name defined twice")
    opdef = OPS.get(node.op)
    if opdef is None:
        raise VerifyError(f"{where}: unknown op '{node.op}'")
    if not opdef.min_inputs <= len(node.inputs) <= opdef.max_inputs:
        raise VerifyError(f"{where}: takes {opdef.min_inputs}..{opdef.max_inputs} inputs, got {len(node.inputs)}")
    keys = set(node.attr)
    missing, unknown = opdef.required - keys, keys - opdef.required - opdef.optional
    if missing or unknown:
        raise VerifyError(f"{where}: missing attrs {sorted(missing)}, unknown attrs {sorted(unknown)}")
    for ref in node.inputs:
        _check_ref(ref, seen, where)
    if typed:
        _check_types(node, seen, where)


def _check_ref(ref, seen: dict[str, Node], where: str) -> None:
    producer = seen.get(ref.node)
    if producer is None:
        raise VerifyError(f"{where}: input {ref} is not defined before use")
    if producer.types is not None and ref.index >= len(producer.types):
        raise VerifyError(f"{where}: {ref} names output {ref.index} of a node with {len(producer.types)}")


def _check_types(node: Node, seen: dict[str, Node], where: str) -> None:
    if node.types is None:
        raise VerifyError(f"{where}: untyped node in a typed graph")
    inputs = [seen[ref.node].types[ref.index] for ref in node.inputs]
    try:
        expected = OPS[node.op].rule(inputs, node.attr)
    except ShapeError as err:
        raise VerifyError(f"{where}: {err}") from None
    if tuple(expected) != node.types:
        raise VerifyError(f"{where}: recorded types {[str(t) for t in node.types]} but the op gives {[str(t) for t in expected]}")


def _check_no_dangling(graph: Graph) -> None:
    live = {ref.node for ref in graph.outputs}
    for node in reversed(graph.nodes):
        if node.name in live:
            live.update(ref.node for ref in node.inputs)
    dangling = [node.name for node in graph.nodes if node.name not in live]
    if dangling:
        raise VerifyError(f"dangling nodes (reach no output): {', '.join(dangling[:8])}")
