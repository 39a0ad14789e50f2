"""Parameters and FLOPs of a ``moe`` layer (and of the MoE inside a spectral_moe layer)."""

from __future__ import annotations

from moec.layers.kind import numel
from moec.layers.mlp.cost import ffn_param_count
from moec.moe.params import EXPERT_PREFIX, ROUTER_WEIGHT
from moec.moe.routers import ROUTERS


def moe_param_count(moe, width: int, router_width: int) -> int:
    """Router, experts, buffers, fallback and shared experts of one ``MoeConfig``."""
    expert, router = moe.expert, ROUTERS[moe.router.kind]
    total = router_width * moe.experts if router.learned else 0  # token_id: no router weight
    total += moe.experts * ffn_param_count(width, expert.hidden, expert.activation, expert.bias)
    total += moe.experts if router.selection_bias else 0  # sigmoid_bias: the selection-bias buffer
    total += moe.experts if moe.router.bias else 0
    total += {"none": 0, "rmsnorm": router_width, "layernorm": 2 * router_width}[moe.router.norm]
    annealed = (moe.router.temperature, moe.router.noise.std if moe.router.noise.kind != "none" else 0.0, moe.capacity.factor)
    total += 3 if any(not isinstance(value, (int, float, type(None))) for value in annealed) else 0  # the router.anneal buffer
    if moe.capacity.fallback == "dense":  # one expert-shaped dense FFN
        total += ffn_param_count(width, expert.hidden, expert.activation, expert.bias)
    if moe.shared_experts is not None:
        total += ffn_param_count(width, moe.shared_experts.count * moe.shared_experts.hidden, expert.activation)
        total += width if moe.shared_experts.gate else 0
    return total


def moe_params(layer, spec) -> int:
    d = spec.model.d_model
    return moe_param_count(layer, d, d)


def routed_token_flops(graph, node) -> float:
    """2 x the multiply-adds of one token through a fused MoE node: router, its top_k of the experts, shared experts."""
    attrs, moe = node.attr, node.attr["moe"]
    per_slot = {slot: numel(graph[ref.node]) for slot, ref in zip(attrs["slots"], node.inputs) if graph[ref.node].op == "param"}
    experts = sum(size for slot, size in per_slot.items() if slot.startswith(EXPERT_PREFIX + "w"))
    shared = sum(size for slot, size in per_slot.items() if slot.startswith("shared."))
    return 2 * (per_slot.get(ROUTER_WEIGHT, 0) + experts * moe.top_k / moe.experts + shared)  # token_id: no router weight


def moe_flops(graph, node, seq: int) -> float:
    return routed_token_flops(graph, node)
