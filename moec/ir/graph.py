"""The graph IR: an ordered list of SSA nodes with typed outputs and spec provenance.

Everything here is immutable; passes build new graphs. A value is a :class:`Ref` to one
output of a node. Shapes mix concrete ints (model dims) with symbols: ``B`` (batch),
``S`` (sequence), ``F`` (= S//2+1, rfft bins) and products such as ``B*S``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Iterable, Iterator, Mapping

Dim = int | str
# An attribute is a primitive, a tuple of them, or a frozen dataclass of them (``MoeAttrs``).
AttrValue = int | float | str | bool | None | tuple | object


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str  # f32, i64, bool, c64

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Ref:
    """Output ``index`` of the node called ``node``."""

    node: str
    index: int = 0

    def __str__(self) -> str:
        return f"%{self.node}" if self.index == 0 else f"%{self.node}#{self.index}"


@dataclass(frozen=True)
class Origin:
    """Where a node comes from: a key path into the spec and, when known, its file line."""

    path: tuple = ()
    file: str | None = None
    line: int | None = None
    column: int | None = None
    label: str = ""  # the path as the spec's errors write it: model.blocks[0].layers[1]

    def __str__(self) -> str:
        where = f"{self.file}:{self.line} " if self.file and self.line else ""
        return f"{where}{self.label or '/'.join(map(str, self.path))}"


def freeze(mapping: Mapping[str, AttrValue] | Iterable[tuple[str, AttrValue]]) -> tuple[tuple[str, AttrValue], ...]:
    items = mapping.items() if isinstance(mapping, Mapping) else mapping
    return tuple((str(key), tuple(value) if isinstance(value, list) else value) for key, value in items)


@dataclass(frozen=True)
class Node:
    name: str
    op: str
    inputs: tuple[Ref, ...] = ()
    attrs: tuple[tuple[str, AttrValue], ...] = ()
    types: tuple[TensorType, ...] | None = None  # filled by infer_shapes
    origin: Origin | None = None
    meta: tuple[tuple[str, AttrValue], ...] = ()  # annotations from passes (placement, stage)

    @cached_property
    def attr(self) -> dict[str, AttrValue]:
        return dict(self.attrs)

    @cached_property
    def meta_dict(self) -> dict[str, AttrValue]:
        return dict(self.meta)

    @property
    def type(self) -> TensorType:
        assert self.types is not None and len(self.types) == 1, f"{self.name} has no single type"
        return self.types[0]

    def out(self, index: int = 0) -> Ref:
        return Ref(self.name, index)

    def with_(self, **changes) -> "Node":
        for key in ("attrs", "meta"):
            if key in changes:
                changes[key] = freeze(changes[key])
        return replace(self, **changes)


@dataclass(frozen=True)
class Graph:
    nodes: tuple[Node, ...]
    outputs: tuple[Ref, ...]  # (prediction, aux_loss)
    typed: bool = False  # every node carries checked types (after infer_shapes)
    notes: tuple[tuple[str, AttrValue], ...] = field(default=())  # graph-level facts (spec name, mesh)

    @cached_property
    def by_name(self) -> dict[str, Node]:
        return {node.name: node for node in self.nodes}

    def __getitem__(self, name: str) -> Node:
        return self.by_name[name]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def type_of(self, ref: Ref) -> TensorType:
        types = self[ref.node].types
        assert types is not None, f"{ref} is untyped"
        return types[ref.index]

    @cached_property
    def users(self) -> dict[str, list[str]]:
        """Node name -> names of the nodes that read any of its outputs (graph outputs as '<output>')."""
        result: dict[str, list[str]] = {node.name: [] for node in self.nodes}
        for node in self.nodes:
            for ref in node.inputs:
                result[ref.node].append(node.name)
        for ref in self.outputs:
            result[ref.node].append("<output>")
        return result

    def params(self) -> list[Node]:
        return [node for node in self.nodes if node.op == "param"]

    def with_nodes(self, nodes: Iterable[Node], outputs: tuple[Ref, ...] | None = None, **changes) -> "Graph":
        return replace(self, nodes=tuple(nodes), outputs=self.outputs if outputs is None else outputs, **changes)


class Namespace:
    """Deterministic, readable SSA names: ``<prefix>_<n>`` with one counter per prefix (as torch.fx)."""

    def __init__(self, taken: Iterable[str] = ()):
        self.taken = set(taken)
        self.counters: dict[str, int] = {}
        for name in self.taken:  # continue past the names already there: add_7 -> the next add is add_8
            prefix, _, number = name.rpartition("_")
            if prefix and number.isdigit():
                self.counters[prefix] = max(self.counters.get(prefix, 0), int(number) + 1)

    def fresh(self, prefix: str) -> str:
        while True:
            name = f"{prefix}_{self.counters.get(prefix, 0)}"
            self.counters[prefix] = self.counters.get(prefix, 0) + 1
            if name not in self.taken:
                self.taken.add(name)
                return name

    def exact(self, name: str) -> str:
        assert name not in self.taken, f"name {name} allocated twice"
        self.taken.add(name)
        return name


def renamed_inputs(node: Node, mapping: Mapping[Ref, Ref]) -> Node:
    """``node`` with every input in ``mapping`` replaced."""
    inputs = tuple(mapping.get(ref, ref) for ref in node.inputs)
    return node if inputs == node.inputs else node.with_(inputs=inputs)
