"""Readable text and Graphviz DOT for a graph.

One node per line::

    %moe_31 : (f32[B,S,64], f32[]) = moe(%rmsnorm_30, ..., experts=8, top_k=2)  # specs/x.yaml:21 model.blocks[0].layers[1]
"""

from __future__ import annotations

import dataclasses
import json

from moec.ir.graph import AttrValue, Graph, Node


def format_attr(value: AttrValue) -> str:
    if dataclasses.is_dataclass(value):  # a typed attribute: Name(field=value, ...), fields at their default left out
        fields = ", ".join(f"{f.name}={format_attr(getattr(value, f.name))}" for f in dataclasses.fields(value)
                           if f.default is dataclasses.MISSING or getattr(value, f.name) != f.default)
        return f"{type(value).__name__}({fields})"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(format_attr(item) for item in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def format_types(node: Node) -> str:
    if node.types is None:
        return "?"
    if len(node.types) == 1:
        return str(node.types[0])
    return "(" + ", ".join(str(t) for t in node.types) + ")"


# A parameter's name and shape are already its SSA name and type.
_IMPLIED = {"param": {"name", "shape"}}


def format_node(node: Node) -> str:
    implied = _IMPLIED.get(node.op, ())
    args = [str(ref) for ref in node.inputs]
    args += [f"{key}={format_attr(value)}" for key, value in node.attrs if key not in implied]
    line = f"%{node.name} : {format_types(node)} = {node.op}({', '.join(args)})"
    if node.meta:
        line += "  {" + ", ".join(f"{key}={format_attr(value)}" for key, value in node.meta) + "}"
    if node.origin is not None:
        line += f"  # {node.origin}"
    return line


def print_graph(graph: Graph) -> str:
    lines = [f"graph {format_attr(dict(graph.notes).get('spec', 'anonymous'))} ({len(graph)} nodes):"]
    lines += ["  " + format_node(node) for node in graph.nodes]
    lines.append("  return " + ", ".join(str(ref) for ref in graph.outputs))
    return "\n".join(lines) + "\n"


def to_dot(graph: Graph, show_params: bool = False) -> str:
    """Graphviz source; parameters are folded into their users unless ``show_params``."""
    hidden = set() if show_params else {node.name for node in graph.nodes if node.op == "param"}
    lines = ["digraph moec {", "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=10];']
    for node in graph.nodes:
        if node.name in hidden:
            continue
        label = f"{node.name}\\n{node.op}\\n{format_types(node)}"
        style = ', style=filled, fillcolor="#ffe4b5"' if node.op in ("moe", "spectral_moe") else ""
        lines.append(f'  "{node.name}" [label="{label}"{style}];')
        for ref in node.inputs:
            if ref.node not in hidden:
                lines.append(f'  "{ref.node}" -> "{node.name}";')
    for i, ref in enumerate(graph.outputs):
        lines.append(f'  "out{i}" [shape=oval]; "{ref.node}" -> "out{i}";')
    lines.append("}")
    return "\n".join(lines) + "\n"
