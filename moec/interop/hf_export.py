"""``moec export hf``: a spec (+ trained weights) -> an HF directory ``from_pretrained`` loads.

The family is read off the spec: per-head q/k norm -> Qwen3-MoE, whole-projection q/k norm ->
OLMoE, a gated shared expert -> Qwen2-MoE, other MoE -> Mixtral; dense with q/k/v-only bias
-> Qwen2, else Llama. Whatever an HF family cannot hold (a router kind, capacity, noise,
learned positions, ...) is refused with the spec path that has it.
"""

from __future__ import annotations

import json
from pathlib import Path

from moec.interop.hf_config import ARCHITECTURES

EXPERT_KEY = {"gpt_oss": "num_local_experts", "mixtral": "num_local_experts", "qwen3_moe": "num_local_experts", "qwen2_moe": "num_experts", "olmoe": "num_experts"}


class NotExportable(ValueError):
    """A spec no supported HF family can represent; the message says which field."""


def unrolled(model) -> list[tuple[str, object, object]]:
    """``(path, attention, ffn)`` per decoder layer, after ``repeat``."""
    layers = []
    for b, block in enumerate(model.blocks):
        where = f"model.blocks[{b}]"
        kinds = [layer.kind for layer in block.layers]
        if kinds not in (["attention", "moe"], ["attention", "mlp"]) or [l.name for l in block.layers] not in ([None, None], ["attention", kinds[1]]):
            raise NotExportable(f"{where}.layers: HF decoder layers are [attention, moe | mlp] with default names, got {kinds}")
        if block.residual != "pre_norm" or block.norm.kind != "rmsnorm":
            raise NotExportable(f"{where}: HF families are pre-norm RMSNorm")
        layers += [(where, block, block.layers)] * block.repeat
    return layers


def _family(model, layers) -> str:
    attentions = {repr(layers[i][2][0].model_copy(update={"window": None})) for i in range(len(layers))}
    if len(attentions) != 1:
        raise NotExportable("model.blocks: every attention layer must be the same in an HF config (but for GPT-OSS's window)")
    attention = layers[0][2][0]
    if attention.sinks:
        return "gpt_oss"
    windows = [i for i in range(len(layers)) if layers[i][2][0].window is not None]
    if windows or attention.rope is not None and attention.rope.scaling is not None:
        raise NotExportable(f"{layers[(windows or [0])[0]][0]}.layers[0]: sliding windows and YaRN export only as GPT-OSS (with sinks)")
    moes = [ffn for _, _, (_, ffn) in layers if ffn.kind == "moe"]
    if not moes:
        return "qwen2" if attention.bias == "qkv" else "llama"
    if attention.qk_norm is not None:
        return "qwen3_moe" if attention.qk_norm.scope == "head" else "olmoe"
    if moes[0].shared_experts is not None:
        return "qwen2_moe"
    return "mixtral"


def _check(model, layers, family: str) -> None:
    def refuse(path: str, why: str):
        raise NotExportable(f"{path}: {why} (exporting as {ARCHITECTURES[family]})")

    if model.inputs.kind != "tokens" or model.head.kind != "lm" or model.head.pool != "none":
        refuse("model.head", "HF causal LMs take token ids and predict every position")
    if model.position != "none":
        refuse("model.position", "HF families use RoPE only")
    if model.final_norm is None or model.final_norm.kind != "rmsnorm":
        refuse("model.final_norm", "HF families end with an RMSNorm")
    attention = layers[0][2][0]
    if attention.rope is None or not attention.causal or attention.dropout:
        refuse(f"{layers[0][0]}.layers[0]", "HF attention is causal, with RoPE and no dropout")
    wants_bias = {"qwen2": "qkv", "qwen2_moe": "qkv", "mixtral": False, "gpt_oss": True}
    if family in wants_bias and attention.bias != wants_bias[family]:
        refuse(f"{layers[0][0]}.layers[0].bias", f"must be {wants_bias[family]!r}")
    if family in ("qwen3_moe", "olmoe") and attention.bias is not False and attention.bias is not True:
        refuse(f"{layers[0][0]}.layers[0].bias", "q/k/v-only bias exists only in Qwen2 families")
    for where, _, (_, ffn) in layers:
        path = f"{where}.layers[1]"
        if ffn.kind == "mlp":
            if ffn.activation != "swiglu" or ffn.bias or family in ("mixtral", "olmoe"):
                refuse(path, "dense layers must be bias-free SwiGLU and exist only in Llama / Qwen families")
            continue
        router, oss = ffn.router, family == "gpt_oss"
        wanted = ("clamped_swiglu" if oss else "swiglu", oss, "topk", 1.0, "none", "dropless", oss)
        if (ffn.expert.activation, ffn.expert.bias, router.kind, router.temperature, router.noise.kind, ffn.capacity.mode,
                router.bias) != wanted:
            refuse(path, "HF MoE layers are dropless softmax top-k routers (temperature 1, no noise) over SwiGLU experts "
                   "(GPT-OSS: clamped, with expert and router biases; others: no biases)")
        if oss and not router.normalize:
            refuse(f"{path}.router.normalize", "GPT-OSS takes the softmax of the top-k logits (normalize: true)")
        if router.norm != "none" or router.dropout:
            refuse(f"{path}.router", "HF MoE routers have no input norm and no router dropout")
        if ffn.aux.entropy or ffn.aux.margin:
            refuse(f"{path}.aux", "HF has no entropy or margin router loss")
        if ffn.aux.z_loss or ffn.aux.load_balance_scope != "model":
            refuse(f"{path}.aux", "HF pools the load-balance loss over the model (load_balance_scope: model) and has no z-loss")
        if family == "mixtral" and not router.normalize:
            refuse(f"{path}.router.normalize", "Mixtral always renormalises the top-k weights")
        shared = ffn.shared_experts
        if family == "qwen2_moe" and (shared is None or shared.count != 1 or not shared.gate):
            refuse(f"{path}.shared_experts", "Qwen2-MoE has one gated shared expert in every MoE layer")
        if family != "qwen2_moe" and shared is not None:
            refuse(f"{path}.shared_experts", "only Qwen2-MoE has shared experts")


def hf_config(spec) -> tuple[dict, str, list[bool]]:
    """(config.json mapping, family, which layers are MoE) for an exportable spec."""
    model = spec.model
    layers = unrolled(model)
    family = _family(model, layers)
    _check(model, layers, family)
    attention = layers[0][2][0]
    moe_layers = [ffn.kind == "moe" for _, _, (_, ffn) in layers]
    dense = [ffn for _, _, (_, ffn) in layers if ffn.kind == "mlp"]
    config = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": model.inputs.vocab,
        "hidden_size": model.d_model,
        "num_hidden_layers": len(layers),
        "num_attention_heads": attention.heads,
        "num_key_value_heads": attention.kv_heads,
        "head_dim": attention.head_dim,
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": layers[0][1].norm.eps,
        "hidden_act": "silu",
        "rope_parameters": _rope(attention.rope),
        "tie_word_embeddings": model.head.tie_embeddings,
        "pad_token_id": model.inputs.pad_id,
        "attention_dropout": 0.0,
    }
    if family in ("llama", "qwen3_moe", "olmoe", "gpt_oss"):
        config["attention_bias"] = attention.bias is True
    if family == "gpt_oss":
        windows = {ffn[0].window for _, _, ffn in layers} - {None}
        if len(windows) > 1:
            raise NotExportable("model.blocks: GPT-OSS has one sliding_window for every sliding layer")
        config["layer_types"] = ["sliding_attention" if ffn[0].window else "full_attention" for _, _, ffn in layers]
        config["sliding_window"] = windows.pop() if windows else None
    if family == "qwen2_moe":
        config["qkv_bias"] = True
    if any(moe_layers):
        moe = next(ffn for _, _, (_, ffn) in layers if ffn.kind == "moe")
        config |= {EXPERT_KEY[family]: moe.experts, "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux.load_balance,
                   "output_router_logits": False}
        if family in ("qwen2_moe", "qwen3_moe"):
            config |= {"moe_intermediate_size": moe.expert.hidden, "decoder_sparse_step": 1,
                       "mlp_only_layers": [i for i, has in enumerate(moe_layers) if not has],
                       "norm_topk_prob": moe.router.normalize}
        if family == "olmoe":
            config["norm_topk_prob"] = moe.router.normalize
        if family == "qwen2_moe":
            config["shared_expert_intermediate_size"] = moe.shared_experts.hidden
        if family == "gpt_oss":
            config |= {"swiglu_limit": moe.expert.swiglu_limit, "swiglu_alpha": moe.expert.swiglu_alpha}
        config["intermediate_size"] = dense[0].hidden if dense else moe.expert.hidden
    else:
        config["intermediate_size"] = dense[0].hidden
    if len({ffn.hidden for ffn in dense}) > 1:
        raise NotExportable("model.blocks: HF configs have one intermediate_size for every dense layer")
    return config, family, moe_layers


def _rope(rope) -> dict:
    if rope.scaling is None:
        return {"rope_type": "default", "rope_theta": rope.theta}
    yarn = rope.scaling
    return {"rope_type": "yarn", "rope_theta": rope.theta, "factor": yarn.factor, "original_max_position_embeddings": yarn.original_max_seq_len,
            "beta_fast": yarn.beta_fast, "beta_slow": yarn.beta_slow, "truncate": yarn.truncate}


def export_hf(spec, weights, directory: Path, shard_bytes: int | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (sharded when large) into ``directory``.

    ``weights``: a state dict (name -> tensor) or a moec weights file.
    """
    from moec.interop.hf_weights import to_hf
    from moec.interop.weights import SHARD_BYTES, ShardWriter, read_all, weight_files

    config, family, moe_layers = hf_config(spec)
    if not isinstance(weights, dict):  # read (a damaged file refused) before anything is written
        weights = read_all(weight_files(Path(weights)))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(directory / "model", shard_bytes or SHARD_BYTES)
    try:
        for name, tensor in to_hf(family, moe_layers, weights):
            writer.add(name, tensor.detach().cpu())
    except BaseException:
        writer.abort()
        raise
    writer.close()
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory
