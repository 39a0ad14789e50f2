"""A small helper that appends nodes to a graph under construction, with provenance."""

from __future__ import annotations

import math

from moec.ir.graph import AttrValue, Namespace, Node, Origin, Ref, freeze
from moec.moe.params import EXPERT_INITS, init_of
from moec.schema.errors import SpecIssue, format_path

MOE_META = "moe"  # meta of the node that closes an MoE decomposition: its MoeAttrs
MOE_AUX_META = "moe_aux"  # ... and the name of the node holding its aux loss
MOE_BALANCE_META = "moe_balance"  # ... and of its balance statistics (aux.load_balance_scope: model)


def origin_issue(origin: Origin | None, message: str) -> SpecIssue:
    """A spec error located where a node came from."""
    if origin is None:
        return SpecIssue(message)
    return SpecIssue(message, path=origin.path, file=origin.file or "<spec>", line=origin.line, column=origin.column)


class GraphBuilder:
    def __init__(self, source=None):
        self.source = source  # LoadedYaml of the spec, for file:line provenance
        self.nodes: list[Node] = []
        self.names = Namespace()
        self.param_refs: dict[str, Ref] = {}

    def origin(self, path: tuple) -> Origin:
        label = format_path(path)
        if self.source is None:
            return Origin(path=path, label=label)
        line, column = self.source.locate(path) or (None, None)
        return Origin(path=path, file=self.source.file, line=line, column=column, label=label)

    def add(self, op: str, inputs: list[Ref], path: tuple, outputs: int = 1, **attrs: AttrValue) -> Ref | tuple[Ref, ...]:
        name = self.names.fresh(op)
        node = Node(name=name, op=op, inputs=tuple(inputs), attrs=freeze(attrs), origin=self.origin(path))
        self.nodes.append(node)
        return node.out() if outputs == 1 else tuple(node.out(i) for i in range(outputs))

    def input_ref(self, name: str) -> Ref:
        """The model input called ``name`` (``tokens``: a token-id router reads it)."""
        return next(node.out() for node in self.nodes if node.op == "input" and node.attr["name"] == name)

    def mark_moe(self, out: Ref, aux: Ref, attrs, balance: Ref | None = None) -> None:
        """Record on ``out``'s node that it closes the decomposition of ``attrs`` (``fuse_moe`` reads it)."""
        index = next(i for i, node in enumerate(self.nodes) if node.name == out.node)
        node = self.nodes[index]
        meta = {**node.meta_dict, MOE_META: attrs, MOE_AUX_META: aux.node}
        if balance is not None:
            meta[MOE_BALANCE_META] = balance.node
        self.nodes[index] = node.with_(meta=meta)

    def param(self, key: str, shape: tuple[int, ...], path: tuple, init: str = "normal", std: float = 0.0,
              group: str = "rest", trainable: bool = True, values: tuple = ()) -> Ref:
        """A named parameter; asking for the same key again returns the same value (weight sharing)."""
        if key in self.param_refs:
            return self.param_refs[key]
        name = self.names.exact(key)
        attrs = {"name": key, "shape": tuple(shape), "init": init, "std": float(std), "trainable": trainable, "group": group}
        attrs |= {"values": tuple(float(v) for v in values)} if init in ("values", "chunks") else {}
        self.nodes.append(Node(name=name, op="param", attrs=freeze(attrs), origin=self.origin(path)))
        self.param_refs[key] = Ref(name)
        return self.param_refs[key]

    def declare(self, spec, prefix: str, path: tuple, decls) -> dict[str, Ref]:
        """Parameters ``<prefix>.<slot>`` for ``moec.moe.ParamDecl`` s; returns slot -> value."""
        params = {}
        for decl in decls:
            init, std = decl.init, init_std(spec, output_projection=decl.output_projection) if decl.init == "normal" else 0.0
            if init in EXPERT_INITS:  # std is the uniform bound for 'uniform'
                init, std = init_of(init, decl.shape, spec.model.num_layers)
            params[decl.slot] = self.param(f"{prefix}.{decl.slot}", decl.shape, path + ((decl.part,) if decl.part else ()), init=init,
                                           std=std, group=decl.group, trainable=decl.trainable, values=decl.values)
        return params

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
