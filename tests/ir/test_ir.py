"""The IR's printer, DOT export and verifier on small hand-built graphs."""

import pytest

from moec.ir import Graph, Node, Origin, Ref, TensorType, VerifyError, print_graph, to_dot, verify
from moec.passes.shapes import infer_shapes


def tiny_graph() -> Graph:
    """values f32[B,S,4] -> linear(W[3,4]) -> output; aux = constant 0."""
    nodes = (
        Node("input_0", "input", attrs=(("name", "values"), ("dtype", "f32"), ("shape", ("B", "S", 4)))),
        Node("w", "param", attrs=(("name", "w"), ("shape", (3, 4)), ("init", "normal"), ("std", 0.02), ("trainable", True))),
        Node("linear_1", "linear", inputs=(Ref("input_0"), Ref("w")), origin=Origin(("model", "head"), "x.yaml", 7, label="model.head")),
        Node("constant_2", "constant", attrs=(("value", 0.0),)),
    )
    return Graph(nodes=nodes, outputs=(Ref("linear_1"), Ref("constant_2")))


def typed_tiny_graph() -> Graph:
    return infer_shapes(tiny_graph())[0]


def test_printer_gives_one_readable_line_per_node():
    text = print_graph(typed_tiny_graph())
    assert text.splitlines() == [
        'graph "anonymous" (4 nodes):',
        '  %input_0 : f32[B,S,4] = input(name="values", dtype="f32", shape=["B", "S", 4])',
        '  %w : f32[3,4] = param(init="normal", std=0.02, trainable=true)',
        "  %linear_1 : f32[B,S,3] = linear(%input_0, %w)  # x.yaml:7 model.head",
        "  %constant_2 : f32[] = constant(value=0.0)",
        "  return %linear_1, %constant_2",
    ]


def test_dot_export_hides_params_by_default():
    dot = to_dot(typed_tiny_graph())
    assert '"input_0" -> "linear_1";' in dot and '"w"' not in dot
    assert '"w" -> "linear_1";' in to_dot(typed_tiny_graph(), show_params=True)


def test_verifier_accepts_a_good_graph():
    verify(tiny_graph())
    verify(typed_tiny_graph())


def _broken(graph: Graph, index: int, **changes) -> Graph:
    nodes = list(graph.nodes)
    nodes[index] = nodes[index].with_(**changes)
    return graph.with_nodes(nodes)


@pytest.mark.parametrize(
    "make_broken, message",
    [
        (lambda g: _broken(g, 2, inputs=(Ref("nowhere"), Ref("w"))), "not defined before use"),
        (lambda g: g.with_nodes([g.nodes[2], *g.nodes[:2], g.nodes[3]]), "not defined before use"),
        (lambda g: _broken(g, 2, op="frobnicate"), "unknown op 'frobnicate'"),
        (lambda g: _broken(g, 3, attrs={}), "missing attrs ['value']"),
        (lambda g: _broken(g, 3, attrs={"value": 0.0, "colour": "red"}), "unknown attrs ['colour']"),
        (lambda g: _broken(g, 2, inputs=(Ref("input_0"),)), "takes 2..3 inputs, got 1"),
        (lambda g: _broken(g, 2, types=(TensorType(("B", "S", 5), "f32"),)), "recorded types"),
        (lambda g: g.with_nodes([*g.nodes, g.nodes[3].with_(name="stray")]), "dangling nodes (reach no output): stray"),
        (lambda g: g.with_nodes([*g.nodes[:3], g.nodes[3].with_(name="linear_1")]), "name defined twice"),
    ],
)
def test_verifier_catches_broken_graphs(make_broken, message):
    broken = make_broken(typed_tiny_graph())
    with pytest.raises(VerifyError) as caught:
        verify(broken)
    assert message in str(caught.value)
