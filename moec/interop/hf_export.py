"""``moec export hf``: a spec (+ trained weights) -> an HF directory ``from_pretrained`` loads.

The family is read off the spec: the one family whose ``claims`` accepts its attention and MoE
layers (sinks -> GPT-OSS; per-head q/k norm -> Qwen3-MoE, whole-projection q/k norm -> OLMoE,
a shared expert -> Qwen2-MoE, other MoE -> Mixtral; dense with q/k/v-only bias -> Qwen2, else
Llama). Whatever an HF family cannot hold (a router kind, capacity, noise, learned positions,
...) is refused with the spec path that has it: the limits every family shares here, the
family's own in its ``check_moe`` and class attributes.
"""

from __future__ import annotations

import json
from pathlib import Path

from moec.interop.errors import NotExportable
from moec.interop.families import FAMILIES, Family
from moec.interop.families.base import Decoder, rope_parameters

__all__ = ["NotExportable", "export_hf", "hf_config", "unrolled"]

ROUTERS = {family.router_kind for family in FAMILIES.values()}


def unrolled(model) -> list[tuple[str, object, object]]:
    """``(path, attention, ffn)`` per decoder layer, after ``repeat``."""
    layers = []
    for b, block in enumerate(model.blocks):
        where = f"model.blocks[{b}]"
        kinds = [layer.kind for layer in block.layers]
        if kinds[0] not in ("attention", "mla") or kinds[1:] not in (["moe"], ["mlp"]) or [l.name for l in block.layers] not in (
                [None, None], kinds):
            raise NotExportable(f"{where}.layers: HF decoder layers are [attention | mla, moe | mlp] with default names, got {kinds}")
        if block.residual != "pre_norm" or block.norm.kind != "rmsnorm":
            raise NotExportable(f"{where}: HF families are pre-norm RMSNorm")
        layers += [(where, block, block.layers)] * block.repeat
    return layers


def _family(decoder: Decoder) -> Family:
    layers = decoder.layers
    attentions = {repr(layers[i][2][0].model_copy(update={"window": None}) if layers[i][2][0].kind == "attention" else layers[i][2][0])
                  for i in range(len(layers))}
    if len(attentions) != 1:
        raise NotExportable("model.blocks: every attention layer must be the same in an HF config (but for GPT-OSS's window)")
    attention = decoder.attention
    moe = decoder.moe
    # The attention kind and the router kind pick the candidates; a router no family has goes to the softmax top-k
    # families, which refuse it by its path (_check_moe).
    router = (moe.router.kind if moe.router.kind in ROUTERS else "topk") if moe is not None else None
    candidates = [family for family in FAMILIES.values() if family.attention_kind == attention.kind
                  and (router is None or family.router_kind == router)]
    if not candidates:
        raise NotExportable(f"{layers[0][0]}.layers: no HF family has {attention.kind!r} attention with a "
                            f"{moe.router.kind if moe else 'dense'!r} layer")
    claimed = [family for family in candidates if family.claims(attention, moe)]
    assert len(claimed) == 1, f"families claiming one spec: {[family.name for family in claimed]}"
    family = claimed[0]
    windows = [i for i in range(len(layers)) if getattr(layers[i][2][0], "window", None) is not None]
    if not family.windows_and_yarn and (windows or attention.rope is not None and attention.rope.scaling is not None):
        raise NotExportable(f"{layers[(windows or [0])[0]][0]}.layers[0]: sliding windows and YaRN export only as GPT-OSS (with sinks)")
    return family


def _check(model, decoder: Decoder, family: Family) -> None:
    def refuse(path: str, why: str):
        raise NotExportable(f"{path}: {why} (exporting as {family.architecture})")

    if model.inputs.kind != "tokens" or model.head.kind != "lm" or model.head.pool != "none":
        refuse("model.head", "HF causal LMs take token ids and predict every position")
    if model.head.mtp is not None and not family.mtp_layers:  # DeepSeek-V3's checkpoints hold them after the model's layers
        refuse("model.head.mtp", "this family's checkpoints have no multi-token prediction layers moec writes; remove head.mtp")
    if model.position != "none":
        refuse("model.position", "HF families use RoPE only")
    if model.final_norm is None or model.final_norm.kind != "rmsnorm":
        refuse("model.final_norm", "HF families end with an RMSNorm")
    if decoder.attention.kind == "attention":
        _check_attention(decoder, family, refuse)
    family.check_attention(decoder.attention, f"{decoder.layers[0][0]}.layers[0]", refuse)
    for where, _, (_, ffn) in decoder.layers:
        path = f"{where}.layers[1]"
        if ffn.kind == "mlp":
            if ffn.activation != "swiglu" or ffn.bias or not family.dense_layers:
                refuse(path, "dense layers must be bias-free SwiGLU and exist only in Llama / Qwen families")
            continue
        _check_moe(ffn, path, family, refuse)
        family.check_moe(ffn, path, refuse)


def _check_attention(decoder: Decoder, family: Family, refuse) -> None:
    attention, path = decoder.attention, f"{decoder.layers[0][0]}.layers[0]"
    if attention.rope is None or not attention.causal or attention.dropout:
        refuse(path, "HF attention is causal, with RoPE and no dropout")
    if attention.rope.fraction != 1.0 and not family.partial_rotary:
        refuse(f"{path}.rope.fraction", "partial rotary (partial_rotary_factor) exports only as GLM-4.5-MoE")
    if family.attention_bias is not None and attention.bias not in _values(family.attention_bias):
        refuse(f"{path}.bias", f"must be {' or '.join(map(repr, _values(family.attention_bias)))}")
    if family.attention_bias is None and attention.bias is not False and attention.bias is not True:
        refuse(f"{path}.bias", "q/k/v-only bias exists only in Qwen2 families")
    if (attention.qk_norm.scope if attention.qk_norm else None) not in _values(family.qk_norm):
        refuse(f"{path}.qk_norm", "q/k norm exists only in Qwen3-MoE and GLM-4.5-MoE (scope: head) and OLMoE (scope: projection)")


def _values(allowed) -> tuple:
    return allowed if isinstance(allowed, tuple) else (allowed,)


def _check_moe(ffn, path: str, family: Family, refuse) -> None:
    """What every family's MoE layer is: a dropless softmax top-k router over SwiGLU experts, HF's aux loss."""
    router, bias = ffn.router, family.expert_and_router_bias
    wanted = (family.expert_activation, bias, family.router_kind, 1.0, "none", "dropless", bias)
    if (ffn.expert.activation, ffn.expert.bias, router.kind, router.temperature, router.noise.kind, ffn.capacity.mode,
            router.bias) != wanted:
        refuse(path, "HF MoE layers are dropless softmax top-k routers (temperature 1, no noise) over SwiGLU experts "
               "(GPT-OSS: clamped, with expert and router biases; others: no biases)")
    if router.norm != "none" or router.dropout:
        refuse(f"{path}.router", "HF MoE routers have no input norm and no router dropout")
    if not family.group_routing and (router.groups != 1 or router.scale != 1.0):
        refuse(f"{path}.router", "the exported HF families have no group-limited routing (groups) and no routed scaling (scale)")
    if ffn.aux.entropy or ffn.aux.margin:
        refuse(f"{path}.aux", "HF has no entropy or margin router loss")
    if ffn.aux.z_loss or ffn.aux.load_balance_scope != "model":
        refuse(f"{path}.aux", "HF pools the load-balance loss over the model (load_balance_scope: model) and has no z-loss")
    if ffn.shared_experts is not None and not family.shared_experts:
        refuse(f"{path}.shared_experts", "only Qwen2-MoE, DeepSeek-V3 and GLM-4.5-MoE have shared experts")


def hf_config(spec) -> tuple[dict, Family, list[bool]]:
    """(config.json mapping, family, which layers are MoE) for an exportable spec."""
    model = spec.model
    decoder = Decoder(unrolled(model))
    family = _family(decoder)
    _check(model, decoder, family)
    attention, moe, dense = decoder.attention, decoder.moe, decoder.dense
    config = {
        "architectures": [family.architecture],
        "model_type": family.name,
        "vocab_size": model.inputs.vocab,
        "hidden_size": model.d_model,
        "num_hidden_layers": len(decoder.layers),
        "num_attention_heads": attention.heads,
        **family.attention_config(attention),
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": decoder.layers[0][1].norm.eps,
        "hidden_act": "silu",
        "tie_word_embeddings": model.head.tie_embeddings,
        "pad_token_id": model.inputs.pad_id,
        "attention_dropout": 0.0,
        "intermediate_size": dense[0].hidden if dense else moe.expert.hidden,
    } | family.config_fields(decoder)
    if moe is not None:
        config |= {family.expert_count_key: moe.experts, "num_experts_per_tok": moe.top_k, "output_router_logits": False}
        if family.aux_loss:
            config["router_aux_loss_coef"] = moe.aux.load_balance
        elif moe.aux.load_balance:
            raise NotExportable(f"model.blocks: {family.architecture} has no auxiliary load-balance loss; set aux.load_balance: 0")
        config |= family.moe_config_fields(moe, decoder)
    if model.head.mtp is not None:  # its layers follow the model's (moec.interop.mtp_layers); HF has no field for its weight
        config["num_nextn_predict_layers"] = model.head.mtp.depth
    if len({ffn.hidden for ffn in dense}) > 1:
        raise NotExportable("model.blocks: HF configs have one intermediate_size for every dense layer")
    return config, family, decoder.moe_layers


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
