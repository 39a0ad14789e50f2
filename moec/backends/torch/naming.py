"""Role names for the values of a generated method: ``q``, ``k``, ``v``, ``attn``, ``h``, ``x``, ``out``.

A method's values are named by what they are, not by the op that made them, and a name is
reused once the value it held is dead, so that a method reads ``q = rope(q, ...)`` and
``x = x + self.attention(self.attention_norm(x))`` rather than a trace of SSA names.
"""

from __future__ import annotations

import keyword

from moec.ir.graph import Graph, Node, Ref

# Names a value may not take: the modules and helpers a method calls.
RESERVED = frozenset({"self", "torch", "F", "nn", "math", "cache", "positions", "local", "copy_to_shards", "sum_over_shards", "triton_moe", "runtime"})

_BY_OP = {
    "embed": "x", "pos_embed": "x", "add": "x", "select_last": "x", "rmsnorm": "h", "layernorm": "h", "attention": "attn",
    "activation": "hidden", "glu": "hidden", "clamped_glu": "hidden", "sigmoid_gate": "out", "constant": "aux",
    "load_balance_pooled": "pooled", "mla_attention": "attn",
}
_NORM_ROLE = {"q_norm": "q", "k_norm": "k", "kv_norm": "kv"}  # a layer's own norm of a projection: the value keeps its role
_SAME_AS_INPUT = {"rope", "head_rmsnorm"}  # q = rope(q, ...): the value keeps its role
_MULTI = {"moe": ("out", "aux", "balance"), "spectral_moe": ("out", "aux"), "dynamics": ("x", "v")}
_LINEAR = {"wq": "q", "wk": "k", "wv": "v", "wo": "out", "w_up": "up", "w_gate": "gate", "w_down": "out", "router": "logits",
           "head": "logits", "input_proj": "x", "shared_gate": "gate",
           "wq_a": "q", "wq_b": "q", "wkv_a": "kv", "wkv_b": "kv"}


def role(graph: Graph, node: Node, index: int, names: dict[Ref, str]) -> str:
    """The role name of output ``index`` of ``node`` (``names``: the names of the values already bound)."""
    if node.op in _MULTI:
        return _MULTI[node.op][index] if index < len(_MULTI[node.op]) else f"out{index}"
    if node.op == "add" and node.types and node.types[0].rank == 0:
        return "aux"
    if node.op == "split":  # the parts name themselves: q_nope, q_pe
        return str(node.attr["parts"][index])
    if node.op == "latent_cache" and node.inputs[index] in names:  # kv, k_pe = latent_cache(kv, k_pe, ...)
        return names[node.inputs[index]]
    if node.op == "rmsnorm" and _leaf(graph, node) in _NORM_ROLE:
        return _NORM_ROLE[_leaf(graph, node)]
    if node.op in _SAME_AS_INPUT and node.inputs[0] in names:
        return names[node.inputs[0]].rstrip("0123456789") or "x"
    if node.op == "linear":
        leaf = _leaf(graph, node)
        return _LINEAR.get(leaf, leaf if leaf.isidentifier() else "y")
    return _BY_OP.get(node.op, node.op)


def _leaf(graph: Graph, node: Node) -> str:
    """The module of a linear's or norm's weight: ``wq`` for ``blocks.0.attention.wq.weight``."""
    parts = str(graph[node.inputs[1].node].attr.get("name", "")).split(".")
    return parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]


class Names:
    """Binds values to names; a name is free again once the value it holds has been read for the last time."""

    def __init__(self, last_use: dict[Ref, int], reserved: set[str] = frozenset()):
        self.last_use = last_use
        self.reserved = set(RESERVED) | set(reserved)
        self.holder: dict[str, Ref] = {}
        self.of: dict[Ref, str] = {}

    def bind(self, ref: Ref, role_name: str, at: int, taken: set[str] = frozenset()) -> str:
        """A name for ``ref`` defined by the statement at ``at``: ``role_name``, else ``role_name2``, ``role_name3``, ..."""
        base = role_name if role_name.isidentifier() and not keyword.iskeyword(role_name) else "value"
        for n in range(1, 1000):
            name = base if n == 1 else f"{base}{n}"
            if name in self.reserved or name in taken:
                continue
            held = self.holder.get(name)
            if held is None or self.last_use.get(held, -1) <= at:
                self.holder[name] = ref
                self.of[ref] = name
                return name
        raise AssertionError(f"no free name for {role_name}")

    def fixed(self, ref: Ref, name: str) -> None:
        """Bind a method argument."""
        self.holder[name] = ref
        self.of[ref] = name


def last_uses(graph: Graph, indices: list[int], returned: list[Ref]) -> dict[Ref, int]:
    """Per value: the position in ``indices`` of its last reader (``len(indices)`` when returned)."""
    last: dict[Ref, int] = {}
    for position, index in enumerate(indices):
        for ref in graph.nodes[index].inputs:
            last[ref] = position
    for ref in returned:
        last[ref] = len(indices)
    return last
