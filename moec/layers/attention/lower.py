"""Lowering of an ``attention`` layer: q / k / v projections, q / k norms, RoPE, attention, output projection."""

from __future__ import annotations

from moec.ir.graph import Ref
from moec.layers.attention.spec import rotary_dim
from moec.layers.kind import Lowering
from moec.passes.builder import init_std


def lower_attention(cx: Lowering, layer, prefix: str, path: tuple, h: Ref) -> Ref:
    b, spec = cx.b, cx.spec
    d, hd = spec.model.d_model, layer.head_dim
    q_width, kv_width = layer.heads * hd, layer.kv_heads * hd
    std, out_std = init_std(spec), init_std(spec, output_projection=True)
    bias = layer.bias  # true: q, k, v and o; "qkv": q, k, v only
    q = b.linear(h, f"{prefix}.wq.weight", q_width, d, path, std, f"{prefix}.wq.bias" if bias else None)
    k = b.linear(h, f"{prefix}.wk.weight", kv_width, d, path, std, f"{prefix}.wk.bias" if bias else None)
    v = b.linear(h, f"{prefix}.wv.weight", kv_width, d, path, std, f"{prefix}.wv.bias" if bias else None)
    if layer.qk_norm is not None:
        q, k = _qk_norm(b, layer, prefix, path + ("qk_norm",), q, k)
    if layer.rope is not None:
        yarn = _yarn_attrs(layer.rope.scaling)
        partial = rotary_dim(layer.rope, hd)
        yarn |= {} if partial is None else {"rotary_dim": partial}  # GLM-4.5's partial rotary
        q = b.add("rope", [q], path + ("rope",), heads=layer.heads, head_dim=hd, theta=layer.rope.theta, **yarn)
        k = b.add("rope", [k], path + ("rope",), heads=layer.kv_heads, head_dim=hd, theta=layer.rope.theta, **yarn)
    sinks = [b.param(f"{prefix}.sinks", (layer.heads,), path + ("sinks",), std=std, group="bias")] if layer.sinks else []
    window = {} if layer.window is None else {"window": layer.window}
    a = b.add("attention", [q, k, v, *sinks], path, heads=layer.heads, kv_heads=layer.kv_heads, head_dim=hd, causal=layer.causal,
              **window)
    return b.linear(a, f"{prefix}.wo.weight", d, q_width, path, out_std, f"{prefix}.wo.bias" if layer.bias is True else None)


def _yarn_attrs(scaling) -> dict:
    if scaling is None:
        return {}
    return {"factor": scaling.factor, "original": scaling.original_max_seq_len, "beta_fast": scaling.beta_fast,
            "beta_slow": scaling.beta_slow, "truncate": scaling.truncate}


def _qk_norm(b, layer, prefix, path, q, k) -> tuple[Ref, Ref]:
    """RMSNorm of q and k: per head with one [head_dim] weight each, or over the whole projection."""
    norm, hd = layer.qk_norm, layer.head_dim
    out = []
    for name, x, heads in (("q_norm", q, layer.heads), ("k_norm", k, layer.kv_heads)):
        if norm.scope == "head":
            weight = b.param(f"{prefix}.{name}.weight", (hd,), path, init="ones", group="norm")
            out.append(b.add("head_rmsnorm", [x, weight], path, eps=norm.eps, heads=heads))
        else:
            weight = b.param(f"{prefix}.{name}.weight", (heads * hd,), path, init="ones", group="norm")
            out.append(b.add("rmsnorm", [x, weight], path, eps=norm.eps))
    return out[0], out[1]
