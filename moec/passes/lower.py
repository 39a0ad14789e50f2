"""``lower``: Spec -> primitive graph.

Blocks with ``repeat`` are unrolled into blocks with distinct parameter names
(``blocks.0``, ``blocks.1``, ...); a spectral layer's ``depth`` steps reuse one set of
parameters. Parameter names are the state_dict keys of every backend.
"""

from __future__ import annotations

from moec.ir.graph import Graph, Ref
from moec.passes.builder import GraphBuilder, init_std
from moec.passes.lower_moe import lower_ffn, lower_moe, lower_spectral_moe
from moec.schema.spec import Spec


def lower(spec: Spec) -> Graph:
    b = GraphBuilder(spec.source)
    model = spec.model
    x = _lower_inputs(b, spec)
    aux_terms: list[Ref] = []
    index = 0
    for entry, block in enumerate(model.blocks):
        for _ in range(block.repeat):
            x = _lower_block(b, spec, block, entry, index, x, aux_terms)
            index += 1
    if model.final_norm is not None:
        x = _norm(b, x, model.final_norm, "final_norm", ("model", "final_norm"), model.d_model)
    prediction = _lower_head(b, spec, x)
    aux = _sum(b, aux_terms, ("model",))
    return Graph(nodes=tuple(b.nodes), outputs=(prediction, aux), notes=(("spec", spec.name),))


def _lower_inputs(b: GraphBuilder, spec: Spec) -> Ref:
    model, path = spec.model, ("model", "inputs")
    d = model.d_model
    if model.inputs.kind == "tokens":
        tokens = b.add("input", [], path, name="tokens", dtype="i64", shape=("B", "S"))
        table = b.param("embed.weight", (model.inputs.vocab, d), path, std=init_std(spec), group="embed")
        x = b.add("embed", [tokens, table], path)
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


def _lower_block(b, spec, block, entry, index, x, aux_terms):
    for j, layer in enumerate(block.layers):
        path = ("model", "blocks", entry, "layers", j)
        prefix = f"blocks.{index}.{layer.name}"
        norm_path = ("model", "blocks", entry, "norm")
        d = spec.model.d_model
        if block.residual == "pre_norm":
            h = _norm(b, x, block.norm, f"{prefix}_norm", norm_path, d)
            y = _lower_layer(b, spec, layer, prefix, path, h, aux_terms)
            x = b.add("add", [x, y], path)
        else:
            y = _lower_layer(b, spec, layer, prefix, path, x, aux_terms)
            x = _norm(b, b.add("add", [x, y], path), block.norm, f"{prefix}_norm", norm_path, d)
    return x


def _lower_layer(b, spec, layer, prefix, path, h, aux_terms) -> Ref:
    d = spec.model.d_model
    if layer.kind == "attention":
        return _lower_attention(b, spec, layer, prefix, path, h)
    if layer.kind == "mlp":
        return lower_ffn(b, spec, h, prefix, path, d, layer.hidden, layer.activation, layer.bias)
    if layer.kind == "moe":
        out, aux = lower_moe(b, spec, layer, h, prefix, path)
    else:
        out, aux = lower_spectral_moe(b, spec, layer, h, prefix, path)
    aux_terms.append(aux)
    return out


def _lower_attention(b, spec, layer, prefix, path, h) -> Ref:
    d, hd = spec.model.d_model, layer.head_dim
    q_width, kv_width = layer.heads * hd, layer.kv_heads * hd
    std, out_std = init_std(spec), init_std(spec, output_projection=True)
    bias = f"{prefix}.b" if layer.bias else None
    q = b.linear(h, f"{prefix}.wq", q_width, d, path, std, bias and bias + "q")
    k = b.linear(h, f"{prefix}.wk", kv_width, d, path, std, bias and bias + "k")
    v = b.linear(h, f"{prefix}.wv", kv_width, d, path, std, bias and bias + "v")
    if layer.rope is not None:
        q = b.add("rope", [q], path + ("rope",), heads=layer.heads, head_dim=hd, theta=layer.rope.theta)
        k = b.add("rope", [k], path + ("rope",), heads=layer.kv_heads, head_dim=hd, theta=layer.rope.theta)
    a = b.add("attention", [q, k, v], path, heads=layer.heads, kv_heads=layer.kv_heads, head_dim=hd, causal=layer.causal)
    return b.linear(a, f"{prefix}.wo", d, q_width, path, out_std, bias and bias + "o")


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
