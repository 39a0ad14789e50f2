"""What a layer kind declares: its spec model, lowering, cost and tensor-parallel groups.

Each kind's folder builds one ``LayerKind`` (its ``KIND``); ``moec.layers.LAYER_KINDS`` lists them.
The compiler's stages find a kind's code through that registry, never by ``if kind == ...``.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal, Mapping

if TYPE_CHECKING:
    from moec.ir.graph import Graph, Node, Ref
    from moec.passes.builder import GraphBuilder
    from moec.schema.spec import Spec


@dataclass(frozen=True)
class TpWeights:
    """The weights of one tensor-parallel group, named by their suffix under their layer (``wq``,
    ``experts.w_up``) or, with ``root``, by their whole name (``embed.weight``). ``split`` is how
    tensor parallelism splits them unless the spec says otherwise (``sharding.tensor.column`` /
    ``row``): by columns (output features) or rows (input features); None: only when the spec names it."""

    names: tuple[str, ...]
    linear: bool = False  # nn.Linear modules: each name's ``.weight`` and ``.bias``
    root: bool = False
    split: Literal["column", "row"] | None = None

    def matches(self, name: str) -> bool:
        """Whether the parameter called ``name`` is one of these weights."""
        suffixes = [f"{n}.{part}" for n in self.names for part in ("weight", "bias")] if self.linear else self.names
        if self.root:
            return name in suffixes
        return any(name.endswith("." + suffix) for suffix in suffixes)


@dataclass
class Lowering:
    """A layer's lowering reads the spec and appends to the graph under construction; an MoE layer
    adds its weighted aux loss (and, pooled over the model, its balance statistics), a dynamics layer
    carries the velocity state to the next one."""

    b: GraphBuilder
    spec: Spec
    aux_terms: list[Ref] = field(default_factory=list)
    balance: list[tuple] = field(default_factory=list)  # aux.load_balance_scope 'model': (stats, path, layer) per MoE layer
    velocity: list[Ref] = field(default_factory=list)  # the dynamics velocity state (empty: v = 0)


LowerFn = Callable[[Lowering, typing.Any, str, tuple, "Ref"], "Ref"]  # (cx, layer, prefix, path, h) -> output
FlopsFn = Callable[["Graph", "Node", int], float]  # (graph, node, seq) -> forward FLOPs per token


@dataclass(frozen=True)
class LayerKind:
    """One layer kind. ``name`` is the ``kind`` literal of its spec model."""

    spec: type  # the pydantic model of the layer's fields
    lower: LowerFn  # its primitive graph ops; returns the layer's output (a dynamics layer: the new residual stream)
    params: Callable[[typing.Any, Spec], int]  # (layer, spec) -> the parameters and buffers its lowering creates
    flops: Mapping[str, FlopsFn] = field(default_factory=dict)  # IR op of the fused graph -> its FLOPs per token
    tp_groups: Mapping[str, TpWeights] = field(default_factory=dict)  # tensor-parallel group -> its weights
    wrapped: bool = True  # x + layer(norm(x)) in its block; False: it updates the residual stream itself
    resolve: Callable[[dict, int], None] = lambda layer, d_model: None  # (dumped layer, d_model): fill its null defaults

    @property
    def name(self) -> str:
        (literal,) = typing.get_args(self.spec.model_fields["kind"].annotation)
        return literal


def numel(node: Node) -> int:
    """Elements of a parameter node."""
    return math.prod(node.attr["shape"])
