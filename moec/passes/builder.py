"""A small helper that appends nodes to a graph under construction, with provenance."""

from __future__ import annotations

import math

from moec.ir.graph import AttrValue, Namespace, Node, Origin, Ref, _freeze


class GraphBuilder:
    def __init__(self, source=None):
        self.source = source  # LoadedYaml of the spec, for file:line provenance
        self.nodes: list[Node] = []
        self.names = Namespace()
        self.param_refs: dict[str, Ref] = {}

    def origin(self, path: tuple) -> Origin:
        if self.source is None:
            return Origin(path=path)
        where = self.source.locate(path)
        line, column = where or (None, None)
        return Origin(path=path, file=self.source.file, line=line, column=column)

    def add(self, op: str, inputs: list[Ref], path: tuple, outputs: int = 1, **attrs: AttrValue) -> Ref | tuple[Ref, ...]:
        name = self.names.fresh(op)
        node = Node(name=name, op=op, inputs=tuple(inputs), attrs=_freeze(attrs), origin=self.origin(path))
        self.nodes.append(node)
        return node.out() if outputs == 1 else tuple(node.out(i) for i in range(outputs))

    def param(self, key: str, shape: tuple[int, ...], path: tuple, init: str = "normal", std: float = 0.0,
              group: str = "rest", trainable: bool = True) -> Ref:
        """A named parameter; asking for the same key again returns the same value (weight sharing)."""
        if key in self.param_refs:
            return self.param_refs[key]
        name = self.names.exact(key)
        attrs = {"name": key, "shape": tuple(shape), "init": init, "std": float(std), "trainable": trainable, "group": group}
        self.nodes.append(Node(name=name, op="param", attrs=_freeze(attrs), origin=self.origin(path)))
        self.param_refs[key] = Ref(name)
        return self.param_refs[key]

    def linear(self, x: Ref, key: str, out: int, width: int, path: tuple, std: float, bias_key: str | None = None,
               group: str = "rest") -> Ref:
        """``x @ W.T (+ b)`` with a fresh ``[out, width]`` weight called ``key``."""
        inputs = [x, self.param(key, (out, width), path, std=std, group=group)]
        if bias_key is not None:
            inputs.append(self.param(bias_key, (out,), path, init="zeros", group="bias"))
        return self.add("linear", inputs, path)


def init_std(spec, output_projection: bool = False) -> float:
    """Normal init std; projections into the residual stream are scaled by depth (GPT-2)."""
    init = spec.model.init
    if output_projection and init.scale_by_depth:
        return init.std / math.sqrt(2 * spec.model.num_layers)
    return init.std
