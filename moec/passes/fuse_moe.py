"""``fuse_moe``: router + topk (+ capacity) + dispatch + experts + combine + aux -> one ``moe`` node.

The pass matches the primitive pattern that ``lower_moe`` writes, starting from each
``combine`` and walking back through its operands. A match whose intermediate values are
read outside the pattern is left alone. The fused node has two outputs (the MoE output and
its weighted aux loss) and records everything a backend needs in its attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moec.ir.graph import Graph, Node, Ref, _freeze
from moec.passes.rewrite import fresh_name, only_used_inside, replace_subgraph, single_user

_ROUTERS = {"softmax": "topk", "sigmoid": "sigmoid_bias", "sinkhorn": "sinkhorn"}


@dataclass
class MoeMatch:
    nodes: set[str] = field(default_factory=set)
    slots: list[tuple[str, Ref]] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)
    out_root: str = ""
    aux_root: str = ""
    origin: object = None


def fuse_moe(graph: Graph) -> tuple[Graph, bool]:
    changed = False
    for combine in [node for node in graph.nodes if node.op == "combine"]:
        if combine.name not in graph.by_name:
            continue
        match = match_moe(graph, graph[combine.name])
        if match is None:
            continue
        graph = _rewrite(graph, match)
        changed = True
    return graph, changed


def match_moe(graph: Graph, combine: Node) -> MoeMatch | None:
    m = MoeMatch(origin=combine.origin)
    experts_node = _producer(graph, combine.inputs[0], "expert_ffn")
    dispatch = experts_node and _producer(graph, experts_node.inputs[0], "dispatch")
    topk = dispatch and _producer(graph, dispatch.inputs[1], "topk")
    scores = topk and graph[topk.inputs[0].node]
    if scores is None or scores.op not in _ROUTERS:
        return None
    noisy = graph[scores.inputs[0].node]
    logits = _producer(graph, noisy.inputs[0], "linear") if noisy.op == "noise" else noisy
    if logits is None or logits.op != "linear":
        return None
    m.nodes |= {combine.name, experts_node.name, dispatch.name, topk.name, scores.name, logits.name, noisy.name}
    h = dispatch.inputs[0]
    m.slots += [("h", h), ("router_in", logits.inputs[0]), ("router.weight", logits.inputs[1])]
    if len(topk.inputs) == 2:
        m.slots.append(("router.selection_bias", topk.inputs[1]))
    if not _match_weights(graph, combine.inputs[1], topk, scores, m):
        return None
    _take_experts(experts_node, m)
    m.out_root = _match_shared(graph, combine, h, m)
    m.aux_root = _match_aux(graph, scores, logits, topk, m)
    if not m.aux_root or not only_used_inside(graph, m.nodes, {m.out_root, m.aux_root}):
        return None
    router = _ROUTERS[scores.op]
    m.attrs.update(
        experts=experts_node.attr["experts"], top_k=topk.attr["k"], router=router,
        temperature=scores.attr.get("temperature", 1.0),
        noise=noisy.attr["kind"] if noisy.op == "noise" else "none",
        noise_std=noisy.attr["std"] if noisy.op == "noise" else 0.0,
        sinkhorn_iters=scores.attr.get("iters", 0), sinkhorn_tau=scores.attr.get("tau", 0.0),
        activation=experts_node.attr["activation"], bias=experts_node.attr["bias"],
    )
    return m


def _producer(graph: Graph, ref: Ref, op: str) -> Node | None:
    node = graph[ref.node]
    return node if node.op == op else None


def _match_weights(graph: Graph, ref: Ref, topk: Node, scores: Node, m: MoeMatch) -> bool:
    """combine weights: topk#0 [-> renormalize] [-> capacity#0]."""
    node = graph[ref.node]
    m.attrs.update(capacity=False, capacity_factor=0.0, drop_policy="none", normalize=False)
    if node.op == "capacity":
        if node.inputs[0] != scores.out() or node.inputs[1] != topk.out(1) or ref.index != 0:
            return False
        m.nodes.add(node.name)
        m.attrs.update(capacity=True, capacity_factor=node.attr["factor"], drop_policy=node.attr["drop_policy"])
        node = graph[node.inputs[2].node]
    if node.op == "renormalize":
        m.nodes.add(node.name)
        m.attrs["normalize"] = True
        node = graph[node.inputs[0].node]
    return node.name == topk.name


def _take_experts(experts_node: Node, m: MoeMatch) -> None:
    params = list(experts_node.inputs[3:] if experts_node.attr["masked"] else experts_node.inputs[2:])
    names = ["experts.w_up"]
    if experts_node.attr["activation"] in ("swiglu", "geglu", "reglu"):
        names.append("experts.w_gate")
    names.append("experts.w_down")
    if experts_node.attr["bias"]:
        names += ["experts.b_up", "experts.b_down"]
    m.slots += list(zip(names, params))


def _match_shared(graph: Graph, combine: Node, h: Ref, m: MoeMatch) -> str:
    """``add(combine, ffn(h))`` absorbs the shared experts; otherwise combine is the output."""
    m.attrs["shared"] = False
    user = single_user(graph, combine.name)
    add = graph.by_name.get(user) if user else None
    if add is None or add.op != "add" or add.inputs[0] != combine.out():
        return combine.name
    down = graph[add.inputs[1].node]
    act = down.op == "linear" and len(down.inputs) == 2 and graph[down.inputs[0].node]
    if not act or act.op not in ("glu", "activation"):
        return combine.name
    ups = [graph[ref.node] for ref in act.inputs]
    if not all(up.op == "linear" and len(up.inputs) == 2 and up.inputs[0] == h for up in ups):
        return combine.name
    up, gate = (ups[1], ups[0]) if act.op == "glu" else (ups[0], None)
    m.slots.append(("shared.w_up", up.inputs[1]))
    if gate is not None:
        m.slots.append(("shared.w_gate", gate.inputs[1]))
    m.slots.append(("shared.w_down", down.inputs[1]))
    m.nodes |= {add.name, down.name, act.name} | {u.name for u in ups}
    m.attrs["shared"] = True
    return add.name


def _match_aux(graph: Graph, scores: Node, logits: Node, topk: Node, m: MoeMatch) -> str:
    """``add(load_balance_loss(scores, idx), z_loss(logits))``; returns the add's name or ''."""
    balance = [graph[u] for u in graph.users[scores.name] if graph.by_name.get(u) and graph[u].op == "load_balance_loss"]
    z = [graph[u] for u in graph.users[logits.name] if graph.by_name.get(u) and graph[u].op == "z_loss"]
    if len(balance) != 1 or len(z) != 1 or balance[0].inputs[1] != topk.out(1):
        return ""
    user = single_user(graph, balance[0].name)
    add = graph.by_name.get(user) if user else None
    if add is None or add.op != "add" or set(add.inputs) != {balance[0].out(), z[0].out()}:
        return ""
    m.nodes |= {balance[0].name, z[0].name, add.name}
    m.attrs.update(load_balance=balance[0].attr["weight"], z_loss=z[0].attr["weight"])
    return add.name


def _rewrite(graph: Graph, m: MoeMatch) -> Graph:
    name = fresh_name(graph, "moe")
    attrs = {"slots": tuple(slot for slot, _ in m.slots), **dict(sorted(m.attrs.items()))}
    node = Node(name=name, op="moe", inputs=tuple(ref for _, ref in m.slots), attrs=_freeze(attrs), origin=m.origin)
    node = node.with_(types=(graph[m.out_root].types[0], graph[m.aux_root].types[0])) if graph.typed else node
    mapping = {Ref(m.out_root): Ref(name, 0), Ref(m.aux_root): Ref(name, 1)}
    return replace_subgraph(graph, m.nodes, node, mapping)
