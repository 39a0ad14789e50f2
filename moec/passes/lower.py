"""``lower``: Spec -> primitive graph.

Blocks with ``repeat`` are unrolled into blocks with distinct parameter names
(``blocks.0``, ``blocks.1``, ...); a spectral layer's ``depth`` steps reuse one set of
parameters. Parameter names are the state_dict keys of every backend.
"""

from __future__ import annotations

import math

from moec.ir.graph import Graph, Ref
from moec.passes.builder import GraphBuilder, init_std
from moec.passes.lower_moe import lower_ffn, lower_moe, lower_spectral_moe
from moec.schema.spec import Spec

CONTROLLER_OUT_STD = 0.01  # the dynamics controller's output weights start small (complexity-deep's normal(0, 0.01))


def lower(spec: Spec) -> Graph:
    b = GraphBuilder(spec.source)
    model = spec.model
    x = _lower_inputs(b, spec)
    aux_terms: list[Ref] = []
    balance: list[tuple[Ref, tuple, object]] = []  # aux.load_balance_scope 'model': (stats, path, layer) per MoE layer
    velocity: list[Ref] = []  # the dynamics layers' velocity state, carried through the blocks (empty: v = 0)
    index = 0
    for entry, block in enumerate(model.blocks):
        for _ in range(block.repeat):
            x = _lower_block(b, spec, block, entry, index, x, aux_terms, balance, velocity)
            index += 1
    if model.final_norm is not None:
        x = _norm(b, x, model.final_norm, "final_norm", ("model", "final_norm"), model.d_model)
    prediction = _lower_head(b, spec, x)
    if balance:
        aux_terms.append(_pooled_load_balance(b, balance))
    aux = _sum(b, aux_terms, ("model",))
    return Graph(nodes=tuple(b.nodes), outputs=(prediction, aux), notes=(("spec", spec.name),))


def _lower_inputs(b: GraphBuilder, spec: Spec) -> Ref:
    model, path = spec.model, ("model", "inputs")
    d = model.d_model
    if model.inputs.kind == "tokens":
        tokens = b.add("input", [], path, name="tokens", dtype="i64", shape=("B", "S"))
        table = b.param("embed.weight", (model.inputs.vocab, d), path, std=init_std(spec), group="embed")
        pad = {} if model.inputs.pad_id is None else {"padding_idx": model.inputs.pad_id}
        x = b.add("embed", [tokens, table], path, **pad)
    else:
        values = b.add("input", [], path, name="values", dtype="f32", shape=("B", "S", model.inputs.dims))
        weight = b.param("input_proj.weight", (d, model.inputs.dims), path, std=init_std(spec), group="embed")
        bias = b.param("input_proj.bias", (d,), path, init="zeros", group="bias")
        x = b.add("linear", [values, weight, bias], path)
    if model.position == "learned":
        pos_path = ("model", "position")
        table = b.param("pos_embed.weight", (model.max_seq_len, d), pos_path, std=init_std(spec), group="embed")
        x = b.add("pos_embed", [x, table], pos_path)
    return x


def _pooled_load_balance(b, balance) -> Ref:
    """One load-balance loss from every layer's statistics (the schema checks that the layers agree)."""
    _, path, layer = balance[0]
    stats = _sum(b, [ref for ref, _, _ in balance], path + ("aux", "load_balance_scope"))
    return b.add("load_balance_pooled", [stats], path + ("aux", "load_balance_scope"), layers=len(balance),
                 experts=layer.experts, weight=layer.aux.load_balance)


def _lower_block(b, spec, block, entry, index, x, aux_terms, balance, velocity):
    for j, layer in enumerate(block.layers):
        path = ("model", "blocks", entry, "layers", j)
        prefix = f"blocks.{index}.{layer.name}"
        if layer.kind == "dynamics":  # updates the residual stream itself: no norm, no residual around it
            x, v = _lower_dynamics(b, spec, layer, prefix, path, x, velocity[-1:])
            velocity[:] = [v]
            continue
        norm_path = ("model", "blocks", entry, "norm")
        d = spec.model.d_model
        if block.residual == "pre_norm":
            h = _norm(b, x, block.norm, f"{prefix}_norm", norm_path, d)
            y = _lower_layer(b, spec, layer, prefix, path, h, aux_terms, balance)
            x = b.add("add", [x, y], path)
        else:
            y = _lower_layer(b, spec, layer, prefix, path, x, aux_terms, balance)
            x = _norm(b, b.add("add", [x, y], path), block.norm, f"{prefix}_norm", norm_path, d)
    return x


def _lower_layer(b, spec, layer, prefix, path, h, aux_terms, balance) -> Ref:
    d = spec.model.d_model
    if layer.kind == "attention":
        return _lower_attention(b, spec, layer, prefix, path, h)
    if layer.kind == "mlp":
        return lower_ffn(b, spec, h, prefix, path, d, layer.hidden, layer.activation, layer.bias)
    if layer.kind == "moe":
        out, aux, *stats = lower_moe(b, spec, layer, h, prefix, path)
        balance += [(ref, path, layer) for ref in stats]
    else:
        out, aux = lower_spectral_moe(b, spec, layer, h, prefix, path)
    aux_terms.append(aux)
    return out


def _lower_attention(b, spec, layer, prefix, path, h) -> Ref:
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
        q = b.add("rope", [q], path + ("rope",), heads=layer.heads, head_dim=hd, theta=layer.rope.theta, **yarn)
        k = b.add("rope", [k], path + ("rope",), heads=layer.kv_heads, head_dim=hd, theta=layer.rope.theta, **yarn)
    sinks = [b.param(f"{prefix}.sinks", (layer.heads,), path + ("sinks",), std=std, group="bias")] if layer.sinks else []
    window = {} if layer.window is None else {"window": layer.window}
    a = b.add("attention", [q, k, v, *sinks], path, heads=layer.heads, kv_heads=layer.kv_heads, head_dim=hd, causal=layer.causal,
              **window)
    return b.linear(a, f"{prefix}.wo.weight", d, q_width, path, out_std, f"{prefix}.wo.bias" if layer.bias is True else None)


def _lower_dynamics(b, spec, layer, prefix, path, x, velocity) -> tuple[Ref, Ref]:
    """``x, v = dynamics(x, v)``: mu, a controller MLP [2D -> C -> 3D] whose output bias starts alpha, beta, gate near their inits."""
    d, hidden = spec.model.d_model, layer.controller_hidden
    mu = b.param(f"{prefix}.mu", (d,), path, init="zeros", group="bias")  # the learned equilibrium: no weight decay
    w_in = b.param(f"{prefix}.controller_in.weight", (hidden, 2 * d), path, std=init_std(spec))
    b_in = b.param(f"{prefix}.controller_in.bias", (hidden,), path, init="zeros", group="bias")
    w_out = b.param(f"{prefix}.controller_out.weight", (3 * d, hidden), path, std=CONTROLLER_OUT_STD)
    bias = (math.log(layer.init_alpha / (1 - layer.init_alpha)), math.log(math.expm1(layer.init_beta)),
            math.log(layer.init_gate / (1 - layer.init_gate)))  # logit, softplus^-1, logit
    b_out = b.param(f"{prefix}.controller_out.bias", (3 * d,), path, init="chunks", values=bias, group="bias")
    return b.add("dynamics", [x, *velocity, mu, w_in, b_in, w_out, b_out], path, outputs=2, dt=layer.dt, beta_max=layer.beta_max,
                 velocity_limit=layer.velocity_limit)


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


def _norm(b, x, norm, prefix, path, width) -> Ref:
    weight = b.param(f"{prefix}.weight", (width,), path, init="ones", group="norm")
    if norm.kind == "rmsnorm":
        return b.add("rmsnorm", [x, weight], path, eps=norm.eps)
    bias = b.param(f"{prefix}.bias", (width,), path, init="zeros", group="norm")
    return b.add("layernorm", [x, weight, bias], path, eps=norm.eps)


def _lower_head(b, spec, x) -> Ref:
    model, path = spec.model, ("model", "head")
    if model.head.pool == "last":
        x = b.add("select_last", [x], path)
    if model.head.kind == "lm":
        if model.head.tie_embeddings:
            weight = b.param_refs["embed.weight"]
        else:
            weight = b.param("head.weight", (model.inputs.vocab, model.d_model), path, std=init_std(spec), group="head")
        return b.add("linear", [x, weight], path)
    weight = b.param("head.weight", (model.head.out_dims, model.d_model), path, std=init_std(spec), group="head")
    bias = b.param("head.bias", (model.head.out_dims,), path, init="zeros", group="bias")
    return b.add("linear", [x, weight, bias], path)


def _sum(b, terms: list[Ref], path: tuple) -> Ref:
    if not terms:
        return b.add("constant", [], path, value=0.0)
    total = terms[0]
    for term in terms[1:]:
        total = b.add("add", [total, term], path)
    return total
