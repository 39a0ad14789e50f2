"""Lowering of an ``mla`` layer: the latent projections and norms, RoPE on the decoupled rope part, the latent cache
point, the key / value expansion, attention, the output projection (HF ``DeepseekV3Attention.forward`` step by step)."""

from __future__ import annotations

import math

from moec.ir.graph import Ref
from moec.layers.kind import Lowering
from moec.passes.builder import init_std


def lower_mla(cx: Lowering, layer, prefix: str, path: tuple, h: Ref) -> Ref:
    b, spec = cx.b, cx.spec
    d, heads, r = spec.model.d_model, layer.heads, layer.kv_lora_rank
    nope, rope, vd = layer.qk_nope_head_dim, layer.qk_rope_head_dim, layer.v_head_dim
    std, out_std = init_std(spec), init_std(spec, output_projection=True)
    bias = layer.bias  # HF's attention_bias: on wq_a, wkv_a and wo
    if layer.q_lora_rank:
        q = b.linear(h, f"{prefix}.wq_a.weight", layer.q_lora_rank, d, path, std, f"{prefix}.wq_a.bias" if bias else None)
        q = _rmsnorm(b, q, f"{prefix}.q_norm.weight", layer.q_lora_rank, layer.norm_eps, path)
        q = b.linear(q, f"{prefix}.wq_b.weight", heads * (nope + rope), layer.q_lora_rank, path, std)
    else:
        q = b.linear(h, f"{prefix}.wq.weight", heads * (nope + rope), d, path, std)
    q_nope, q_pe = b.add("split", [q], path, outputs=2, sizes=(nope, rope), heads=heads, parts=("q_nope", "q_pe"))
    rotary = rope_attrs(layer.rope)
    q_pe = b.add("rope", [q_pe], path + ("rope",), heads=heads, head_dim=rope, **rotary)
    kv = b.linear(h, f"{prefix}.wkv_a.weight", r + rope, d, path, std, f"{prefix}.wkv_a.bias" if bias else None)
    kv, k_pe = b.add("split", [kv], path, outputs=2, sizes=(r, rope), heads=1, parts=("kv", "k_pe"))
    kv = _rmsnorm(b, kv, f"{prefix}.kv_norm.weight", r, layer.norm_eps, path)
    k_pe = b.add("rope", [k_pe], path + ("rope",), heads=1, head_dim=rope, **rotary)
    kv, k_pe = b.add("latent_cache", [kv, k_pe], path, outputs=2)  # what a decode cache holds: r + rope values per token
    kv = b.linear(kv, f"{prefix}.wkv_b.weight", heads * (nope + vd), r, path, std)
    k_nope, v = b.add("split", [kv], path, outputs=2, sizes=(nope, vd), heads=heads, parts=("k_nope", "v"))
    a = b.add("mla_attention", [q_nope, q_pe, k_nope, k_pe, v], path, heads=heads, scale=softmax_scale(layer))
    return b.linear(a, f"{prefix}.wo.weight", d, heads * vd, path, out_std, f"{prefix}.wo.bias" if bias else None)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's m(s) = 0.1 * s * ln(factor) + 1 (HF ``yarn_get_mscale``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(layer) -> float:
    """1 / sqrt(qk head dim), times m(mscale_all_dim)^2 under YaRN (HF ``yarn_apply_mscale``)."""
    scale = (layer.qk_nope_head_dim + layer.qk_rope_head_dim) ** (-0.5)
    yarn = layer.rope.scaling
    if yarn is not None and yarn.mscale_all_dim:
        mscale = yarn_mscale(yarn.factor, yarn.mscale_all_dim)
        scale = scale * mscale * mscale
    return scale


def rope_attrs(rope) -> dict:
    """The rope op's attributes: theta, the interleaved pairs, YaRN; ``scale`` (cos / sin) where DeepSeek's mscale sets it."""
    attrs = {"theta": rope.theta, **({"interleave": True} if rope.interleave else {})}
    yarn = rope.scaling
    if yarn is None:
        return attrs
    attrs.update(factor=yarn.factor, original=yarn.original_max_seq_len, beta_fast=yarn.beta_fast, beta_slow=yarn.beta_slow,
                 truncate=yarn.truncate)
    if yarn.mscale and yarn.mscale_all_dim:  # else YaRN's own 0.1 * ln(factor) + 1
        attrs["scale"] = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    return attrs


def _rmsnorm(b, x: Ref, key: str, width: int, eps: float, path: tuple) -> Ref:
    weight = b.param(key, (width,), path, init="ones", group="norm")
    return b.add("rmsnorm", [x, weight], path, eps=eps)
