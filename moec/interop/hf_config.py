"""A Hugging Face ``config.json`` <-> the ``model`` section of a moec spec.

One table per architecture says what moec reads; every other key of the config is either
known not to change the math (``INERT``), required to hold a value moec implements
(``_required``), or refused by name. Nothing is silently dropped.

The mapping (HF decoder layer ``i`` = moec block ``i`` with an ``attention`` and a ``moe``
or ``mlp`` layer; consecutive identical layers are one spec block with ``repeat``):

| HF | moec |
| --- | --- |
| ``rms_norm_eps``, ``hidden_act: silu`` | ``norm: {kind: rmsnorm, eps}``, ``activation: swiglu`` |
| ``qkv_bias`` (Qwen2) / ``attention_bias`` | ``attention.bias: qkv`` / ``true`` |
| Qwen3-MoE / OLMoE ``q_norm``, ``k_norm`` | ``attention.qk_norm.scope: head`` / ``projection`` |
| ``norm_topk_prob`` (Mixtral: always) | ``router.normalize`` |
| ``shared_expert_intermediate_size`` + ``shared_expert_gate`` | ``shared_experts: {count: 1, hidden, gate: true}`` |
| ``router_aux_loss_coef`` | ``aux: {load_balance: coef, load_balance_scope: model}`` |
| ``decoder_sparse_step``, ``mlp_only_layers`` | dense ``mlp`` blocks of ``intermediate_size`` |
| ``pad_token_id`` | ``inputs.pad_id`` |
"""

from __future__ import annotations

import re


class UnsupportedConfig(ValueError):
    """A config field (or value) moec cannot express; the message names it."""


# Keys that do not change what the model computes (bookkeeping, generation, outputs).
INERT = frozenset(
    "_name_or_path architectures bos_token_id eos_token_id chunk_size_feed_forward dtype torch_dtype id2label label2id "
    "initializer_range is_encoder_decoder model_type output_attentions output_hidden_states output_router_logits "
    "problem_type return_dict transformers_version use_cache tokenizer_class max_window_layers".split()
)

FAMILIES = {  # architecture -> (family, model_type)
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "GptOssForCausalLM": "gpt_oss",
}
MODEL_TYPES = {family: family for family in FAMILIES.values()}
ARCHITECTURES = {family: arch for arch, family in FAMILIES.items()}

_COMMON = ("vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim max_position_embeddings "
           "rms_norm_eps hidden_act rope_parameters rope_theta rope_scaling tie_word_embeddings pad_token_id attention_dropout "
           "intermediate_size")
_MOE = "num_experts num_local_experts num_experts_per_tok router_aux_loss_coef"
_QWEN = "sliding_window use_sliding_window layer_types decoder_sparse_step mlp_only_layers moe_intermediate_size norm_topk_prob"
READS = {  # what each family reads (beyond INERT)
    "mixtral": f"{_COMMON} {_MOE} sliding_window router_jitter_noise",
    "qwen2_moe": f"{_COMMON} {_MOE} {_QWEN} qkv_bias shared_expert_intermediate_size",
    "qwen3_moe": f"{_COMMON} {_MOE} {_QWEN} attention_bias",
    "olmoe": f"{_COMMON} {_MOE} attention_bias clip_qkv norm_topk_prob",
    "llama": f"{_COMMON} attention_bias mlp_bias pretraining_tp",
    "qwen2": f"{_COMMON} sliding_window use_sliding_window layer_types",
    "gpt_oss": f"{_COMMON} {_MOE} attention_bias layer_types sliding_window swiglu_limit swiglu_alpha experts_per_token "
               "initial_context_length",
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
YARN_KEYS = {"rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate"}


def family_of(config: dict) -> str:
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    if config.get("model_type") in MODEL_TYPES and not archs:
        return MODEL_TYPES[config["model_type"]]
    name = archs[0] if archs else config.get("model_type", "<no architectures or model_type>")
    raise UnsupportedConfig(f"architecture {name!r} cannot be imported; moec imports {', '.join(FAMILIES)}")


def _required(config: dict, family: str) -> None:
    """Values moec implements only one way: anything else is refused with its field name."""
    def need(key: str, ok, what: str) -> None:
        if key in config and not ok(config[key]):
            raise UnsupportedConfig(f"config field {key!r} = {config[key]!r} is not supported: {what}")

    need("hidden_act", lambda v: v == "silu", "moec's experts and MLPs are SwiGLU (silu)")
    for key in ("num_local_experts", "num_experts", "num_experts_per_tok"):
        need(key, lambda v: type(v) is int and v >= 1, "an MoE layer needs at least one expert, and routes to at least one")
    need("attention_dropout", lambda v: v == 0, "attention dropout is not implemented")
    need("router_jitter_noise", lambda v: v == 0, "multiplicative router jitter is not implemented")
    need("clip_qkv", lambda v: v is None, "q/k/v clipping is not implemented")
    need("mlp_bias", lambda v: v is False, "MLP biases on dense layers are not mapped")
    need("pretraining_tp", lambda v: v == 1, "only pretraining_tp 1 computes the plain linear layers")
    need("rope_scaling", lambda v: v is None, "RoPE scaling is not implemented")
    # Qwen's sliding_window acts only with use_sliding_window; Mixtral's acts whenever it is set.
    need("use_sliding_window", lambda v: v is False, "sliding-window attention is not implemented for this family")
    if family == "mixtral":
        need("sliding_window", lambda v: v is None, "sliding-window attention is not implemented for this family")
    if family == "gpt_oss":
        need("layer_types", lambda v: set(v) <= {"full_attention", "sliding_attention"}, "layers are full or sliding attention")
        need("experts_per_token", lambda v: v == config.get("num_experts_per_tok"), "it must equal num_experts_per_tok")
        need("attention_bias", lambda v: v is True, "GPT-OSS attention has biases")
        for key in ("rope_parameters", "rope_scaling"):
            need(key, lambda v: v is None or v.get("rope_type") in ("default", "yarn") and set(v) <= YARN_KEYS,
                 f"only plain RoPE or YaRN with the keys {sorted(YARN_KEYS)} is implemented")
        return
    need("layer_types", lambda v: all(t == "full_attention" for t in v), "only full attention is implemented for this family")
    need("rope_parameters", lambda v: v is None or v.get("rope_type", "default") == "default" and set(v) <= {"rope_type", "rope_theta"},
         "only plain RoPE (rope_type 'default') is implemented for this family")


def check_fields(config: dict, family: str) -> None:
    known = INERT | set(READS[family].split())
    unknown = sorted(key for key in config if key not in known)
    if unknown:
        raise UnsupportedConfig(f"config field {unknown[0]!r} of {ARCHITECTURES[family]} cannot be expressed in a moec spec"
                                + (f" (also: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""))
    _required(config, family)


def rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def rope_section(config: dict) -> dict:
    """``{theta[, scaling: yarn]}`` from v5 ``rope_parameters`` or v4 ``rope_scaling`` + ``rope_theta``."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope = {"theta": rope_theta(config)}
    if params.get("rope_type") == "yarn":  # the defaults of HF's _compute_yarn_parameters
        rope["scaling"] = {"kind": "yarn", "factor": float(params["factor"]),
                           "original_max_seq_len": params["original_max_position_embeddings"],
                           "beta_fast": float(params.get("beta_fast") or 32.0), "beta_slow": float(params.get("beta_slow") or 1.0),
                           "truncate": bool(params.get("truncate", True))}
    return rope


def moe_layer_indices(config: dict, family: str) -> list[bool]:
    """For each decoder layer: does it have an MoE (else a dense MLP)?"""
    layers = config["num_hidden_layers"]
    if family not in MOE_FAMILIES:
        return [False] * layers
    step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
    return [i not in dense and (i + 1) % step == 0 for i in range(layers)]


def model_section(config: dict, family: str) -> dict:
    """The spec's ``model`` mapping for a checked config."""
    d, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    attention = {"kind": "attention", "heads": heads, "kv_heads": config.get("num_key_value_heads") or heads,
                 "head_dim": head_dim, "rope": rope_section(config)}
    if family in ("qwen2", "qwen2_moe") and config.get("qkv_bias", True):
        attention["bias"] = "qkv"
    elif config.get("attention_bias"):
        attention["bias"] = True
    if family == "qwen3_moe":
        attention["qk_norm"] = {"scope": "head", "eps": config["rms_norm_eps"]}
    elif family == "olmoe":
        attention["qk_norm"] = {"scope": "projection", "eps": config["rms_norm_eps"]}
    if family == "gpt_oss":
        attention["sinks"] = True
    norm = {"kind": "rmsnorm", "eps": config["rms_norm_eps"]}
    layers = []
    types = config.get("layer_types") or ["full_attention"] * config["num_hidden_layers"]
    for has_moe, kind in zip(moe_layer_indices(config, family), types):
        ffn = _moe_layer(config, family) if has_moe else {"kind": "mlp", "hidden": config["intermediate_size"], "activation": "swiglu"}
        own = dict(attention, window=config["sliding_window"]) if kind == "sliding_attention" else attention
        layers.append([own, ffn])
    blocks = []
    for layer in layers:  # consecutive equal layers: one block with repeat
        if blocks and blocks[-1]["layers"] == layer:
            blocks[-1]["repeat"] += 1
        else:
            blocks.append({"repeat": 1, "norm": norm, "layers": layer})
    inputs = {"kind": "tokens", "vocab": config["vocab_size"]}
    if config.get("pad_token_id") is not None and 0 <= config["pad_token_id"] < config["vocab_size"]:
        inputs["pad_id"] = config["pad_token_id"]
    return {
        "d_model": d,
        "max_seq_len": config["max_position_embeddings"],
        "inputs": inputs,
        "blocks": blocks,
        "final_norm": norm,
        "head": {"kind": "lm", "tie_embeddings": bool(config.get("tie_word_embeddings", False))},
    }


def _moe_layer(config: dict, family: str) -> dict:
    experts = config.get("num_local_experts") or config.get("num_experts")
    layer = {
        "kind": "moe",
        "experts": experts,
        "top_k": config["num_experts_per_tok"],
        "expert": {"hidden": config.get("moe_intermediate_size") or config["intermediate_size"], "activation": "swiglu"},
        "router": {"kind": "topk", "normalize": True if family == "mixtral" else bool(config.get("norm_topk_prob", False))},
    }
    if family == "gpt_oss":  # softmax over the top-k logits = the renormalised top-k of the full softmax
        layer["expert"] |= {"activation": "clamped_swiglu", "bias": True, "swiglu_limit": float(config.get("swiglu_limit", 7.0)),
                            "swiglu_alpha": float(config.get("swiglu_alpha", 1.702))}
        layer["router"] |= {"normalize": True, "bias": True}
    if family == "qwen2_moe" and config.get("shared_expert_intermediate_size"):
        layer["shared_experts"] = {"count": 1, "hidden": config["shared_expert_intermediate_size"], "gate": True}
    # HF adds router_aux_loss_coef * load_balancing_loss_func(all layers) when output_router_logits is on.
    layer["aux"] = {"load_balance": float(config.get("router_aux_loss_coef", 0.0)), "load_balance_scope": "model", "z_loss": 0.0}
    return layer


def safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.-")
    return name or "imported"
