"""What every Hugging Face family shares: the Llama-style decoder layer and the ``Family`` interface.

HF decoder layer ``i`` is moec block ``i``: ``model.layers.<i>.<hf suffix>`` <-> ``blocks.<i>.<moec
suffix>``. The moec names of the tensors every family shares (attention, dense MLP, shared
expert) are written once, in ``ATTENTION``, ``SWIGLU`` and ``SHARED_SWIGLU`` below; a family adds only its own
(q/k norms, sinks, router, experts).

A family (``families/<model_type>.py``) subclasses ``Family``, sets its class attributes and
overrides the hooks where it differs from the Llama-style defaults written here. The drivers
(``hf_config``, ``hf_weights``, ``hf_export``) call only these attributes and hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from moec.interop.errors import UnsupportedConfig

GLOBAL = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "final_norm.weight", "lm_head.weight": "head.weight"}
# HF ``self_attn.<key>`` -> moec ``attention.<value>``: the one place these moec names are written.
ATTENTION = {f"{p}_proj.{leaf}": f"w{p}.{leaf}" for p in "qkvo" for leaf in ("weight", "bias")}  # nn.Linear s
# HF ``<mlp>.<key>`` -> moec ``<mlp>.<value>`` for a dense SwiGLU MLP (nn.Linear s) and a shared expert (the fused
# MoE layer's own parameters): the one place.
SWIGLU = {"gate_proj.weight": "w_gate.weight", "up_proj.weight": "w_up.weight", "down_proj.weight": "w_down.weight"}
SHARED_SWIGLU = {"gate_proj.weight": "w_gate", "up_proj.weight": "w_up", "down_proj.weight": "w_down"}
QK_NORM = {"q_norm.weight": "q_norm.weight", "k_norm.weight": "k_norm.weight"}
ROUTER = "moe.router."
EXPERTS = "moe.experts."  # moec's stacked expert weights: EXPERTS + w_gate_up [E, 2, I, H], w_down (+ b_* with biases)

# Config fields (beyond ``hf_config.INERT``) every family reads, and every MoE family.
COMMON_READS = ("vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim "
                "max_position_embeddings rms_norm_eps hidden_act rope_parameters rope_theta rope_scaling tie_word_embeddings "
                "pad_token_id attention_dropout intermediate_size").split()
MOE_READS = "num_experts num_local_experts num_experts_per_tok router_aux_loss_coef".split()
Refuse = Callable[[str, str], None]  # (spec path, why) -> raises NotExportable


def prefixed(hf: str, ours: str, table: dict[str, str]) -> dict[str, str]:
    return {hf + key: ours + value for key, value in table.items()}


def need(config: dict, key: str, ok: Callable[[object], bool], what: str) -> None:
    """A value moec implements only one way: anything else is refused with its field name."""
    if key in config and not ok(config[key]):
        raise UnsupportedConfig(f"config field {key!r} = {config[key]!r} is not supported: {what}")


def expert_count(config: dict) -> int:
    return config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts") or 0


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


def rope_parameters(rope) -> dict:
    if rope.scaling is None:
        return {"rope_type": "default", "rope_theta": rope.theta}
    yarn = rope.scaling
    return {"rope_type": "yarn", "rope_theta": rope.theta, "factor": yarn.factor, "original_max_position_embeddings": yarn.original_max_seq_len,
            "beta_fast": yarn.beta_fast, "beta_slow": yarn.beta_slow, "truncate": yarn.truncate}


@dataclass(frozen=True)
class Decoder:
    """A spec's decoder as export sees it: ``(spec path, block, [attention, ffn])`` per HF layer, after ``repeat``."""

    layers: list[tuple[str, object, list]]

    @property
    def attention(self):
        return self.layers[0][2][0]

    @property
    def moe_layers(self) -> list[bool]:
        return [ffn.kind == "moe" for _, _, (_, ffn) in self.layers]

    @property
    def moe(self):
        """The first MoE layer (export reads the MoE fields off it), or None."""
        return next((ffn for _, _, (_, ffn) in self.layers if ffn.kind == "moe"), None)

    @property
    def dense(self) -> list:
        return [ffn for _, _, (_, ffn) in self.layers if ffn.kind == "mlp"]


class Family:
    """One Hugging Face model family: config mapping, tensor names, expert layout, export limits."""

    name: str  # HF model_type, the registry key
    architecture: str  # config.json ``architectures``
    reads: frozenset[str]  # config fields read beyond INERT; any other field is refused by name
    moe = False  # has MoE layers: then ``expert_layout`` and ``expert_count_key`` say how experts are stored
    expert_count_key = "num_experts"
    expert_layout = None
    # What export accepts (hf_export checks these for every family).
    attention_bias: bool | str | tuple | None = None  # the value (or values) the family's attention bias takes; None: True or False
    qk_norm: str | tuple | None = None  # the scope (or scopes) of its q/k norm (None: none)
    windows_and_yarn = False  # sliding windows and YaRN RoPE
    dense_layers = True  # dense MLP layers beside MoE ones
    shared_experts = False
    expert_activation = "swiglu"
    expert_and_router_bias = False
    attention_kind = "attention"  # the spec's attention layer kind, also its moec name (``<kind>_norm``, ``<kind>.``)
    router_kind = "topk"
    group_routing = False  # router groups / top_groups / scale (DeepSeek's n_group, topk_group, routed_scaling_factor)
    aux_loss = True  # HF adds router_aux_loss_coef * its load-balance loss (config field router_aux_loss_coef)
    mtp_layers = False  # the checkpoint's multi-token prediction layers map to head.mtp (moec.interop.mtp_layers)
    partial_rotary = False  # rope.fraction < 1 (HF's partial_rotary_factor)

    # --- config.json -> spec ---

    def check_config(self, config: dict) -> None:
        """Family-specific refusals of values (``hf_config`` has checked the common ones)."""
        need(config, "layer_types", lambda v: all(t == "full_attention" for t in v),
             "only full attention is implemented for this family")
        need(config, "rope_parameters",
             lambda v: v is None or v.get("rope_type", "default") == "default" and set(v) <= {"rope_type", "rope_theta"},
             "only plain RoPE (rope_type 'default') is implemented for this family")

    def attention_layer(self, config: dict) -> dict:
        """The spec's attention layer (every decoder layer's; ``hf_config`` adds a sliding window)."""
        d, heads = config["hidden_size"], config["num_attention_heads"]
        return {"kind": "attention", "heads": heads, "kv_heads": config.get("num_key_value_heads") or heads,
                "head_dim": config.get("head_dim") or d // heads, "rope": rope_section(config)} | self.attention_fields(config)

    def sparse_layers(self, config: dict) -> list[bool]:
        """For each decoder layer: does it have an MoE (else a dense MLP)? Qwen's decoder_sparse_step / mlp_only_layers."""
        layers = config["num_hidden_layers"]
        if not self.moe:
            return [False] * layers
        step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
        return [i not in dense and (i + 1) % step == 0 for i in range(layers)]

    def import_notes(self, config: dict, mtp_imported: bool = False) -> list[str]:
        """What the import leaves out on purpose (written into the spec's header and the import's report);
        ``mtp_imported``: the checkpoint's multi-token prediction layers became head.mtp."""
        return []

    def attention_fields(self, config: dict) -> dict:
        """The attention layer's fields after kind, heads, kv_heads, head_dim and rope."""
        return {"bias": True} if config.get("attention_bias") else {}

    def moe_layer(self, config: dict) -> dict:
        layer = {"kind": "moe", "experts": expert_count(config), "top_k": config["num_experts_per_tok"],
                 "expert": self.expert_fields(config), "router": self.router_fields(config), **self.shared_expert_fields(config)}
        # HF adds router_aux_loss_coef * load_balancing_loss_func(all layers) when output_router_logits is on.
        layer["aux"] = {"load_balance": float(config.get("router_aux_loss_coef", 0.0)), "load_balance_scope": "model",
                        "z_loss": 0.0}
        return layer

    def expert_fields(self, config: dict) -> dict:
        return {"hidden": config.get("moe_intermediate_size") or config["intermediate_size"], "activation": "swiglu"}

    def router_fields(self, config: dict) -> dict:
        return {"kind": "topk", "normalize": bool(config.get("norm_topk_prob", False))}

    def shared_expert_fields(self, config: dict) -> dict:
        return {}

    # --- tensor names ---

    def layer_names(self, has_moe: bool) -> dict[str, str]:
        """HF suffix within ``model.layers.<i>.`` -> moec suffix within ``blocks.<i>.``, both ways."""
        ffn, attention = "moe" if has_moe else "mlp", self.attention_kind
        names = {"input_layernorm.weight": f"{attention}_norm.weight", "post_attention_layernorm.weight": f"{ffn}_norm.weight"}
        names |= prefixed("self_attn.", f"{attention}.", self.attention_table())
        return names | (self.moe_names() if has_moe else prefixed("mlp.", "mlp.", SWIGLU))

    def attention_table(self) -> dict[str, str]:
        """All attention tensors: HF ``self_attn.<key>`` -> moec ``<attention_kind>.<value>``."""
        return ATTENTION | self.attention_names()

    def attention_names(self) -> dict[str, str]:
        """Attention tensors beyond q/k/v/o: HF ``self_attn.<key>`` -> moec ``attention.<value>``."""
        return {}

    def moe_names(self) -> dict[str, str]:
        """An MoE layer's tensors but the experts (the router; a shared expert)."""
        return {"mlp.gate.weight": ROUTER + "weight"}

    def import_aliases(self, has_moe: bool) -> dict[str, str]:
        """Other HF names import also reads (export writes ``layer_names``)."""
        return {}

    # --- spec -> config.json ---

    def claims(self, attention, moe) -> bool:
        """Is a spec with this attention and first MoE layer (None: dense) exported as this family?

        Exactly one family claims each spec (tests/interop/test_families.py checks it)."""
        raise NotImplementedError

    def check_attention(self, attention, path: str, refuse: Refuse) -> None:
        """Family-specific refusals of the attention layer (``hf_export`` checks plain attention's common limits)."""

    def attention_config(self, attention) -> dict:
        """config.json fields of the attention layer: heads beyond num_attention_heads, head size, RoPE."""
        return {"num_key_value_heads": attention.kv_heads, "head_dim": attention.head_dim, "rope_parameters": rope_parameters(attention.rope)}

    def check_moe(self, ffn, path: str, refuse: Refuse) -> None:
        """Family-specific refusals of an MoE layer (``hf_export`` has checked the common ones)."""

    def config_fields(self, decoder: Decoder) -> dict:
        """config.json fields beyond the common ones."""
        return {"attention_bias": decoder.attention.bias is True}

    def moe_config_fields(self, moe, decoder: Decoder) -> dict:
        """config.json MoE fields beyond the expert count, top-k and aux coefficient."""
        return {}
