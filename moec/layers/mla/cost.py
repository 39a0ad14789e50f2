"""Parameters and FLOPs of an ``mla`` layer."""

from __future__ import annotations


def mla_params(layer, spec) -> int:
    """The q projections (and q_norm), wkv_a, kv_norm, wkv_b, wo, with HF's attention_bias on wq_a, wkv_a and wo."""
    d, heads, r = spec.model.d_model, layer.heads, layer.kv_lora_rank
    qk = layer.qk_nope_head_dim + layer.qk_rope_head_dim
    rank = layer.q_lora_rank or 0
    total = d * rank + rank + rank * heads * qk if rank else d * heads * qk
    total += d * (r + layer.qk_rope_head_dim) + r + r * heads * (layer.qk_nope_head_dim + layer.v_head_dim)
    total += heads * layer.v_head_dim * d
    if layer.bias:
        total += rank + r + layer.qk_rope_head_dim + d
    return total


def mla_flops(graph, node, seq: int) -> float:
    """QK^T over nope + rope dims and AV over the value dims, at ``seq`` positions, the causal mask not discounted
    (the projections are ``linear`` nodes)."""
    q_nope, q_pe, _, _, v = (graph.type_of(ref).shape[-1] for ref in node.inputs)
    return 2 * seq * (q_nope + q_pe + v)
