"""The statements of one generated method: graph nodes written with role names, no ``del``.

A :class:`Body` writes the nodes of one method (a layer's ``forward``, a block's, the root's)
in graph order. Values get role names (``moec.backends.torch.naming``); a norm module or a
layer call read once by the next statement is written inside it, so that a block reads
``x = x + self.attention(self.attention_norm(x))``. Parameters are read relative to the
method's module (``owner``), through ``self.<module>(x)`` where they sit in a torch module.
Under tensor parallelism the rank-local forms come from ``moec.backends.torch.codegen_tp``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from moec.backends.torch import codegen_tp
from moec.backends.torch.blocks import attribute_expr, is_fused
from moec.backends.torch.naming import Names, last_uses, role
from moec.ir.graph import Graph, Node, Ref

INDENT = "        "


def stats_ref(name: str) -> Ref:
    """The MoeStats a fused node (or a layer call holding one) returns after its graph outputs: not a graph value."""
    return Ref(name, 99)


def param_expr(name: str, owner: str = "") -> str:
    """``blocks.3.moe.experts.w_up`` -> ``self.moe.experts.w_up`` inside ``blocks.3``."""
    return attribute_expr(name.removeprefix(owner + ".") if owner else name)


@dataclass
class Statement:
    targets: list[str]
    expr: str
    inline: bool = False  # may be written inside its one reader when that is the next statement
    lines: list[str] = field(default_factory=list)  # a multi-line statement (if / else), written as is

    def render(self) -> list[str]:
        if self.lines:
            return self.lines
        if not self.targets:
            return [f"{INDENT}{self.expr}"]
        return [f"{INDENT}{', '.join(self.targets)} = {self.expr}"]


class Body:
    """The statements of one method over the nodes ``indices`` of ``graph``."""

    def __init__(self, emitter, owner: str, indices: list[int], returned: list[Ref]):
        self.emitter, self.graph, self.owner = emitter, emitter.graph, owner
        self.indices = indices
        self.position = {index: p for p, index in enumerate(indices)}
        self.names = Names(last_uses(self.graph, indices, returned))
        self.statements: list[Statement] = []
        self.splits = emitter.splits

    # --- values -------------------------------------------------------------------------------------
    def arg(self, ref: Ref, name: str) -> None:
        self.names.fixed(ref, name)

    def name(self, ref: Ref) -> str:
        node = self.graph[ref.node]
        return param_expr(node.attr["name"], self.owner) if node.op == "param" else self.names.of[ref]

    def bind(self, refs: list[Ref], roles: list[str], at: int) -> list[str]:
        taken: set[str] = set()
        names = []
        for ref, role_name in zip(refs, roles):
            names.append(self.names.bind(ref, role_name, at, taken))
            taken.add(names[-1])
        return names

    def at(self, index: int) -> int:
        return self.position.get(index, len(self.indices))

    # --- statements ---------------------------------------------------------------------------------
    def node(self, index: int) -> None:
        """One graph node as one statement."""
        node = self.graph.nodes[index]
        args = [self.name(ref) for ref in node.inputs]
        module = self.module_call(node, args)
        if module is None and self.splits:
            node, args = self.tensor_parallel(node, args)
        expr = module or self.emitter.expression(node, args, self)
        refs = [Ref(node.name, i) for i in range(len(node.types or (None,)))]
        stats = is_fused(node)
        if expr is None:  # the identity (MLA's latent_cache outside decoding): the outputs are the inputs
            for ref, name in zip(refs, args):
                self.names.fixed(ref, name)
            return
        if isinstance(expr, list):  # a multi-line form (attention with its decode branch)
            targets = self.bind(refs, [role(self.graph, node, i, self.names.of) for i in range(len(refs))], self.at(index))
            if any("@TARGETS@" in line for line in expr):  # updates its inputs in one branch: they must keep their names
                assert targets == args, f"{node.name}: {targets} != {args}"
            self.statements.append(Statement(targets, "", lines=[line.replace("@TARGETS@", ", ".join(targets))
                                                                 .replace("@TARGET@", targets[0]) for line in expr]))
            return
        targets = self.bind(refs, [role(self.graph, node, i, self.names.of) for i in range(len(refs))], self.at(index))
        if stats:
            targets.append(self.names.bind(stats_ref(node.name), "stats", len(self.indices)))
        inline = module is not None and node.op in ("rmsnorm", "layernorm")
        self.statements.append(Statement(targets, expr, inline=inline))

    def call(self, targets: list[str], expr: str, inline: bool = False) -> None:
        self.statements.append(Statement(targets, expr, inline=inline))

    def raw(self, line: str) -> None:
        self.statements.append(Statement([], "", lines=[line]))

    def module_call(self, node: Node, args: list[str]) -> str | None:
        """``self.attention_norm(x)``: a norm, linear or embedding whose parameters form a torch module."""
        if node.op not in ("rmsnorm", "layernorm", "linear", "embed") or len(node.inputs) < 2:
            return None
        weight = self.graph[node.inputs[1].node]
        if weight.op != "param":
            return None
        owner, leaf = str(weight.attr["name"]).rsplit(".", 1) if "." in weight.attr["name"] else ("", "")
        kind = self.emitter.modules.get(owner)
        wanted = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm", "linear": "Linear", "embed": "Embedding"}[node.op]
        if kind != wanted or leaf != "weight":
            return None
        return f"{param_expr(owner, self.owner)}({args[0]})"

    # --- tensor parallelism (moec.backends.torch.codegen_tp) ----------------------------------------
    def tensor_parallel(self, node: Node, args: list[str]) -> tuple[Node, list[str]]:
        """The rank-local form of a node that is not a torch module call: attention, RoPE and MLA's per-head splits
        count their heads from the local projections, MLA's shared rope key enters the split heads through f, a
        linear reading a split table it does not own (a tied head) reads its local rows."""
        if node.op in ("rope", "attention", "split", "mla_attention"):
            node = codegen_tp.local_heads(node, args, self.per_head(node))
        if node.op == "mla_attention" and self.head_split(node.inputs[2]) is not None:  # k_pe: its last reader
            self.raw(INDENT + codegen_tp.shared_rope_key(args[3], self.name(self.head_split(node.inputs[2]))))
        if node.op == "linear" and self.graph[node.inputs[1].node].attr.get("name") in self.splits:
            return node, codegen_tp.tied_head(args)
        return node, args

    def per_head(self, node: Node) -> int:
        """The width of one head of ``node``'s first input."""
        if node.op == "split":
            return sum(node.attr["sizes"])
        if node.op == "mla_attention":
            return self.graph.type_of(node.inputs[0]).shape[-1] // node.attr["heads"]
        return node.attr["head_dim"]

    def head_split(self, part: Ref) -> Ref | None:
        """The split weight of the projection that a per-head part (MLA's k_nope: a split of wkv_b's output) comes from."""
        linear = self.graph[self.graph[part.node].inputs[0].node]
        weight = linear.inputs[1] if linear.op == "linear" else None
        return weight if weight is not None and self.graph[weight.node].attr.get("name") in self.splits else None

    # --- output -------------------------------------------------------------------------------------
    def lines(self, returned: list[str]) -> list[str]:
        """The method body, ending in ``return``; single-use module calls written inside their reader."""
        statements = list(self.statements)
        last = statements[-1] if statements else None
        if last is not None and not last.lines and last.targets and last.targets == returned and not _reads(last, returned[0]):
            statements[-1] = Statement([], f"return {last.expr}")  # the last value computed is the result
        elif returned:
            statements.append(Statement([], f"return {', '.join(returned)}"))
        statements = _inline(statements)
        return [line for statement in statements for line in statement.render()]


def _reads(statement: Statement, name: str) -> int:
    text = statement.expr if not statement.lines else "\n".join(statement.lines)
    return len(re.findall(rf"(?<![\w.]){re.escape(name)}\b", text))


def _inline(statements: list[Statement]) -> list[Statement]:
    """Write ``t = self.norm(x)`` inside the next statement when that is its one reader."""
    result: list[Statement] = []
    for position, statement in enumerate(statements):
        result.append(statement)
        while len(result) >= 2 and _can_inline(result[-2], result[-1], statements[position + 1:]):
            source, reader = result[-2], result[-1]
            name = source.targets[0]
            reader.expr = re.sub(rf"(?<![\w.]){re.escape(name)}\b", lambda _: source.expr, reader.expr, count=1)
            del result[-2]
    return result


def _can_inline(source: Statement, reader: Statement, later: list[Statement]) -> bool:
    if not source.inline or len(source.targets) != 1 or reader.lines or _reads(reader, source.targets[0]) != 1:
        return False
    name = source.targets[0]
    if name in reader.targets:  # the reader binds the name again: nothing after it reads this value
        return len(reader.expr) + len(source.expr) < 110
    for statement in later:  # nobody after the reader reads the value before the name is bound again
        if _reads(statement, name):
            return False
        if name in statement.targets:
            break
    return len(reader.expr) + len(source.expr) < 110
