"""``lower``: Spec -> primitive graph.

Blocks with ``repeat`` are unrolled into blocks with distinct parameter names
(``blocks.0``, ``blocks.1``, ...); a spectral layer's ``depth`` steps reuse one set of
parameters. Parameter names are the state_dict keys of every backend. Each layer is lowered by its
kind (``moec.layers.LAYER_KINDS``); this pass lowers the inputs, the blocks' norms and residuals, the
head and the model's aux loss.
"""

from __future__ import annotations

from moec.ir.graph import Graph, Ref
from moec.layers import LAYER_KINDS, Lowering
from moec.passes.builder import GraphBuilder, init_std
from moec.schema.model import Norm
from moec.schema.spec import Spec


def lower(spec: Spec) -> Graph:
    b = GraphBuilder(spec.source)
    model = spec.model
    x = _lower_inputs(b, spec)
    cx = Lowering(b, spec)  # the MoE layers' aux terms and balance statistics, the dynamics velocity
    index = 0
    for entry, block in enumerate(model.blocks):
        for _ in range(block.repeat):
            x = _lower_block(cx, block, entry, f"blocks.{index}", x)
            index += 1
    hidden = x  # the last block's output: depth 1 of multi-token prediction reads it
    if model.final_norm is not None:
        x = _norm(b, x, model.final_norm, "final_norm", ("model", "final_norm"), model.d_model)
    prediction = _lower_head(b, spec, x)
    if cx.balance:
        cx.aux_terms.append(_pooled_load_balance(b, cx.balance))
    aux = _sum(b, cx.aux_terms, ("model",))
    mtp = _lower_mtp(Lowering(b, spec), hidden) if model.head.kind == "lm" and model.head.mtp is not None else ()
    return Graph(nodes=tuple(b.nodes), outputs=(prediction, aux, *mtp), notes=(("spec", spec.name),))


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


def _lower_block(cx: Lowering, block, entry: int, owner: str, x: Ref) -> Ref:
    """Each layer through its kind's lowering, wrapped as x + layer(norm(x)) or norm(x + layer(x)) unless its kind
    updates the residual stream itself."""
    b, d = cx.b, cx.spec.model.d_model
    norm_path = ("model", "blocks", entry, "norm")
    for j, layer in enumerate(block.layers):
        path = ("model", "blocks", entry, "layers", j)
        prefix = f"{owner}.{layer.name}"
        kind = LAYER_KINDS[layer.kind]
        if not kind.wrapped:
            x = kind.lower(cx, layer, prefix, path, x)
        elif block.residual == "pre_norm":
            h = _norm(b, x, block.norm, f"{prefix}_norm", norm_path, d)
            x = b.add("add", [x, kind.lower(cx, layer, prefix, path, h)], path)
        else:
            y = kind.lower(cx, layer, prefix, path, x)
            x = _norm(b, b.add("add", [x, y], path), block.norm, f"{prefix}_norm", norm_path, d)
    return x


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


def _lower_mtp(cx: Lowering, hidden: Ref) -> tuple[Ref, ...]:
    """DeepSeek-V3's multi-token prediction modules: the logits of each depth k = 1..D, position i predicting token i+k+1,
    then the sum of their blocks' aux losses (the graph's outputs after prediction and aux; only the main model's
    nodes reach the first two).

    Module k: h = eh_proj(RMSNorm(embed(token i+k)) ++ RMSNorm(h_{k-1})) (the embedding first, as DeepSeek-V3's
    checkpoints and Megatron order it; h_0 is the last block's output before the final norm), one block shaped like
    the spec's last block, then RMSNorm and the shared head. The sequence keeps its length S: token i+k is the input
    shifted left by k with id 0 in the last k positions, whose predictions have no target (causal attention keeps
    them from earlier positions)."""
    b, spec = cx.b, cx.spec
    model, mtp, path = spec.model, spec.model.head.mtp, ("model", "head", "mtp")
    d, last = model.d_model, model.blocks[-1]
    norm = Norm(kind="rmsnorm", eps=last.norm.eps)
    tokens = next(Ref(node.name) for node in b.nodes if node.op == "input")
    head = b.param_refs["embed.weight"] if model.head.tie_embeddings else b.param_refs["head.weight"]
    pad = {} if model.inputs.pad_id is None else {"padding_idx": model.inputs.pad_id}
    logits = []
    for k in range(1, mtp.depth + 1):
        owner = f"mtp.{k - 1}"
        shifted = b.add("shift_tokens", [tokens], path, steps=k)
        e = _norm(b, b.add("embed", [shifted, b.param_refs["embed.weight"]], path, **pad), norm, f"{owner}.enorm", path, d)
        h = _norm(b, hidden, norm, f"{owner}.hnorm", path, d)
        proj = b.param(f"{owner}.eh_proj.weight", (d, 2 * d), path, std=init_std(spec), group="mtp")
        hidden = _lower_block(cx, last, len(model.blocks) - 1, f"{owner}.block", b.add("linear", [b.add("concat", [e, h], path), proj], path))
        logits.append(b.add("linear", [_norm(b, hidden, norm, f"{owner}.norm", path, d), head], path))
    if cx.balance:  # load_balance_scope 'model' with load_balance 0 (HF's DeepSeek-V3): a zero term, as the model's
        cx.aux_terms.append(_pooled_load_balance(b, cx.balance))
    return (*logits, _sum(b, cx.aux_terms, path))


def _sum(b, terms: list[Ref], path: tuple) -> Ref:
    if not terms:
        return b.add("constant", [], path, value=0.0)
    total = terms[0]
    for term in terms[1:]:
        total = b.add("add", [total, term], path)
    return total
