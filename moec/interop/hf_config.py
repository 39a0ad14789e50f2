"""A Hugging Face ``config.json`` <-> the ``model`` section of a moec spec.

Each family (``families/<model_type>.py``) says which fields it reads; every other key of the
config is either known not to change the math (``INERT``), required to hold a value moec
implements (``_required`` and the family's ``check_config``), or refused by name. Nothing is
silently dropped.

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

from moec.interop.errors import UnsupportedConfig
from moec.interop.families import BY_ARCHITECTURE, FAMILIES, Family
from moec.interop.families.base import need, rope_section, rope_theta

__all__ = ["UnsupportedConfig", "check_fields", "family_of", "model_section", "moe_layer_indices", "rope_section", "safe_name"]

# Keys that do not change what the model computes (bookkeeping, generation, outputs).
INERT = frozenset(
    "_name_or_path architectures bos_token_id eos_token_id chunk_size_feed_forward dtype torch_dtype id2label label2id "
    "initializer_range is_encoder_decoder model_type output_attentions output_hidden_states output_router_logits "
    "problem_type return_dict transformers_version use_cache tokenizer_class max_window_layers".split()
)


def family_of(config: dict) -> Family:
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[arch]
    if config.get("model_type") in FAMILIES and not archs:
        return FAMILIES[config["model_type"]]
    name = archs[0] if archs else config.get("model_type", "<no architectures or model_type>")
    raise UnsupportedConfig(f"architecture {name!r} cannot be imported; moec imports {', '.join(BY_ARCHITECTURE)}")


def _required(config: dict, family: Family) -> None:
    """Values moec implements only one way: anything else is refused with its field name."""
    need(config, "hidden_act", lambda v: v == "silu", "moec's experts and MLPs are SwiGLU (silu)")
    for key in ("num_local_experts", "num_experts", "num_experts_per_tok"):
        need(config, key, lambda v: type(v) is int and v >= 1, "an MoE layer needs at least one expert, and routes to at least one")
    need(config, "attention_dropout", lambda v: v == 0, "attention dropout is not implemented")
    need(config, "router_jitter_noise", lambda v: v == 0, "multiplicative router jitter is not implemented")
    need(config, "clip_qkv", lambda v: v is None, "q/k/v clipping is not implemented")
    need(config, "mlp_bias", lambda v: v is False, "MLP biases on dense layers are not mapped")
    need(config, "pretraining_tp", lambda v: v == 1, "only pretraining_tp 1 computes the plain linear layers")
    need(config, "rope_scaling", lambda v: v is None, "RoPE scaling is not implemented")
    # Qwen's sliding_window acts only with use_sliding_window; Mixtral's acts whenever it is set (its check_config).
    need(config, "use_sliding_window", lambda v: v is False, "sliding-window attention is not implemented for this family")
    family.check_config(config)


def check_fields(config: dict, family: Family) -> None:
    known = INERT | family.reads
    unknown = sorted(key for key in config if key not in known)
    if unknown:
        raise UnsupportedConfig(f"config field {unknown[0]!r} of {family.architecture} cannot be expressed in a moec spec"
                                + (f" (also: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""))
    _required(config, family)


def moe_layer_indices(config: dict, family: Family) -> list[bool]:
    """For each decoder layer: does it have an MoE (else a dense MLP)?"""
    return family.sparse_layers(config)


def model_section(config: dict, family: Family) -> dict:
    """The spec's ``model`` mapping for a checked config."""
    d = config["hidden_size"]
    attention = family.attention_layer(config)
    norm = {"kind": "rmsnorm", "eps": config["rms_norm_eps"]}
    layers = []
    types = config.get("layer_types") or ["full_attention"] * config["num_hidden_layers"]
    dense = {"kind": "mlp", "hidden": config["intermediate_size"], "activation": "swiglu"}
    for has_moe, kind in zip(moe_layer_indices(config, family), types):
        ffn = family.moe_layer(config) if has_moe else dense
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


def safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.-")
    return name or "imported"
