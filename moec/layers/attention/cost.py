"""Parameters and FLOPs of an ``attention`` layer."""

from __future__ import annotations


def attention_params(layer, spec) -> int:
    """q, k, v and output projections (with their biases), sinks, q / k norm weights."""
    d = spec.model.d_model
    q, kv = layer.heads * layer.head_dim, layer.kv_heads * layer.head_dim
    total = d * (2 * q + 2 * kv)
    total += {True: q + 2 * kv + d, "qkv": q + 2 * kv}.get(layer.bias, 0)
    total += layer.heads if layer.sinks else 0
    if layer.qk_norm is not None:
        total += 2 * layer.head_dim if layer.qk_norm.scope == "head" else q + kv
    return total


def attention_flops(graph, node, seq: int) -> float:
    """QK^T and AV at ``seq`` positions, the causal mask not discounted (the projections are ``linear`` nodes)."""
    return 4 * seq * node.attr["heads"] * node.attr["head_dim"]
