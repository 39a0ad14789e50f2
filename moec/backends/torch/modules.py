"""The parameters of a generated class: torch's own modules where they fit, stacked tensors elsewhere.

A group of parameters under one name becomes ``nn.Linear``, ``nn.RMSNorm``, ``nn.LayerNorm`` or
``nn.Embedding`` when it holds exactly what that module holds and is used as it uses it (so a
block writes ``self.attention_norm(x)``); any other group (stacked expert weights, a router
with a selection bias, a layer's own projections) holds plain ``nn.Parameter`` s. The
state_dict keys stay the graph's parameter names.
"""

from __future__ import annotations

from moec.backends.torch.blocks import attribute_expr
from moec.ir.graph import Graph

INIT_ARGS = "device: torch.device | str | None = None, dtype: torch.dtype = torch.float32"
_FUSED = ("moe", "spectral_moe")


def standard_modules(graph: Graph) -> dict[str, str]:
    """Parameter owner (``blocks.0.attention_norm``) -> the torch module class that holds it."""
    params = {node.name: node for node in graph.params()}
    uses: dict[str, set[tuple[str, int]]] = {}
    users: dict[str, list] = {}
    for node in graph.nodes:
        for position, ref in enumerate(node.inputs):
            if ref.node in params:
                name = params[ref.node].attr["name"]
                uses.setdefault(name, set()).add((node.op, -1 if node.op in _FUSED else position))
                users.setdefault(name, []).append(node)
    owners: dict[str, dict[str, object]] = {}
    for node in params.values():
        name = str(node.attr["name"])
        if "." in name:
            owner, leaf = name.rsplit(".", 1)
            owners.setdefault(owner, {})[leaf] = node
    result = {}
    for owner, leaves in owners.items():
        kind = _kind(owner, leaves, uses)
        if kind:
            result[owner] = kind
    return result


def _kind(owner: str, leaves: dict, uses: dict) -> str | None:
    if "weight" not in leaves or set(leaves) - {"weight", "bias"} or not all(n.attr["trainable"] for n in leaves.values()):
        return None
    weight = leaves["weight"]
    rank, name = len(weight.attr["shape"]), weight.attr["name"]
    weight_uses = uses.get(name, set())
    bias_uses = uses.get(leaves["bias"].attr["name"], set()) if "bias" in leaves else set()
    fused = {(op, -1) for op in _FUSED}
    if rank == 1 and set(leaves) == {"weight"} and weight_uses <= {("rmsnorm", 1)} | fused and weight_uses:
        return "RMSNorm"
    if rank == 1 and set(leaves) == {"weight", "bias"} and weight_uses <= {("layernorm", 1)} | fused \
            and bias_uses <= {("layernorm", 2)} | fused and weight_uses:
        return "LayerNorm"
    if rank == 2 and ("embed", 1) in weight_uses and weight_uses <= {("embed", 1), ("linear", 1)} and "bias" not in leaves:
        return "Embedding"
    read_by_linear = ("linear", 1) in weight_uses or owner.rsplit(".", 1)[-1] == "router"  # a router: the fused node's linear
    if rank == 2 and read_by_linear and weight_uses <= {("linear", 1)} | fused and bias_uses <= {("linear", 2)} | fused:
        return "Linear"
    return None


def _module(kind: str, leaves: dict, graph: Graph) -> str:
    weight = leaves["weight"]
    shape = tuple(weight.attr["shape"])
    where = "device=device, dtype=dtype"
    if kind == "Linear":
        return f"nn.Linear({shape[1]}, {shape[0]}, bias={'bias' in leaves}, {where})"
    if kind == "Embedding":
        pad = next((n.attr.get("padding_idx") for n in graph.nodes if n.op == "embed" and graph[n.inputs[1].node] is weight), None)
        return f"nn.Embedding({shape[0]}, {shape[1]}{'' if pad is None else f', padding_idx={pad}'}, {where})"
    eps = next((n.attr["eps"] for n in graph.nodes if n.op in ("rmsnorm", "layernorm") and graph[n.inputs[1].node] is weight), None)
    eps_arg = "" if eps is None else f", eps={eps!r}"
    return f"nn.{kind}({shape[0]}{eps_arg}, {where})"


def declarations(graph: Graph, names: list[str], prefix: str, modules: dict[str, str]) -> list[str]:
    """``__init__`` lines for the parameters ``names`` (in order), relative to the module at ``prefix``."""
    nodes = {node.attr["name"]: node for node in graph.params()}
    groups: dict[str, dict[str, object]] = {}
    for name in names:
        relative = name.removeprefix(prefix + ".") if prefix else name
        owner, leaf = relative.rsplit(".", 1) if "." in relative else ("", relative)
        groups.setdefault(owner, {})[leaf] = nodes[name]
    lines, made = [], {""}
    for owner, leaves in groups.items():
        parts = owner.split(".") if owner else []
        for depth in range(1, len(parts)):
            parent = ".".join(parts[:depth])
            if parent not in made:
                lines.append(f"        {attribute_expr(parent)} = nn.Module()")
                made.add(parent)
        full = f"{prefix}.{owner}" if prefix and owner else (owner or prefix)
        kind = modules.get(full) if owner else None
        if kind:
            lines.append(f"        {attribute_expr(owner)} = {_module(kind, leaves, graph)}")
        elif owner:
            lines.append(f"        {attribute_expr(owner)} = {_parameters(leaves)}")
        else:
            lines += [_direct(leaf, node) for leaf, node in leaves.items()]
        made.add(owner)
    return lines


def _parameters(leaves: dict) -> str:
    trainable = {leaf: tuple(n.attr["shape"]) for leaf, n in leaves.items() if n.attr["trainable"]}
    frozen = {leaf: tuple(n.attr["shape"]) for leaf, n in leaves.items() if not n.attr["trainable"]}
    shapes = ", ".join(f"{k!r}: {v!r}" for k, v in trainable.items())
    extra = f", {{{', '.join(f'{k!r}: {v!r}' for k, v in frozen.items())}}}" if frozen else ""
    return f"make_parameters(device, dtype, {{{shapes}}}{extra})"


def _direct(leaf: str, node) -> str:
    shape = tuple(node.attr["shape"])
    if node.attr["trainable"]:
        return f"        self.{leaf} = nn.Parameter(torch.empty({shape!r}, device=device, dtype=dtype))"
    return f"        self.register_buffer({leaf!r}, torch.empty({shape!r}, device=device, dtype=dtype))"
