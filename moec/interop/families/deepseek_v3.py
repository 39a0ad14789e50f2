"""DeepSeek-V3 (``DeepseekV3ForCausalLM``; also Kimi K2 and Moonlight): multi-head latent attention (the ``mla``
layer kind), ``first_k_dense_replace`` dense layers, then MoE layers with a sigmoid router, a selection bias
(``e_score_correction_bias``), group-limited routing (``n_group`` / ``topk_group``), routed scaling and one
shared expert of ``n_shared_experts * moe_intermediate_size``. HF computes no auxiliary loss.

``GROUP_ROUTED_READS``, ``group_routed_moe`` and the MoE tensor names are shared with GLM-4.5-MoE (``glm4_moe.py``).
Multi-token prediction layers (``num_nextn_predict_layers``) are not built by HF's ``DeepseekV3ForCausalLM``,
but DeepSeek-V3's checkpoints hold them after the model's layers: the import maps them to ``head.mtp`` when the
checkpoint has them (``moec.interop.mtp_layers``), else leaves them out and says so; the export writes them back.
GLM-4.5's are left out.
"""

from moec.interop.families.base import COMMON_READS, MOE_READS, ROUTER, SHARED_SWIGLU, Family, need, prefixed, rope_section
from moec.interop.families.experts import MLP_EXPERTS

GROUP_ROUTED_READS = COMMON_READS + MOE_READS + ("n_routed_experts n_shared_experts moe_intermediate_size routed_scaling_factor "
                                                 "n_group topk_group first_k_dense_replace norm_topk_prob attention_bias "
                                                 "num_nextn_predict_layers num_mtp_layers pretraining_tp").split()
MLA_NAMES = {"q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a",
             "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo"}
YARN_KEYS = {"rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"}


def mtp_depth(config: dict) -> int:
    return config.get("num_nextn_predict_layers") or config.get("num_mtp_layers") or 0


class GroupRouted(Family):
    """What DeepSeek-V3 and GLM-4.5-MoE share: the MoE layers and where they are."""

    moe, expert_count_key, expert_layout = True, "n_routed_experts", MLP_EXPERTS
    shared_experts, router_kind, group_routing, aux_loss = True, "sigmoid_bias", True, False

    def check_config(self, config: dict) -> None:
        need(config, "n_group", lambda v: v is None or type(v) is int and v >= 1, "a positive number of expert groups")
        need(config, "n_shared_experts", lambda v: v is None or type(v) is int and v >= 0, "a count of shared experts")

    def sparse_layers(self, config: dict) -> list[bool]:
        first = config.get("first_k_dense_replace") or 0
        return [i >= first for i in range(config["num_hidden_layers"])]

    def import_notes(self, config: dict, mtp_imported: bool = False) -> list[str]:
        depth = mtp_depth(config)
        if not depth or mtp_imported:
            return []
        where = "the checkpoint holds none" if self.mtp_layers else f"{self.architecture} builds none"
        return [f"{depth} multi-token prediction layer(s) (num_nextn_predict_layers; {where})"]

    def moe_layer(self, config: dict) -> dict:
        return super().moe_layer(config) | {"aux": {"load_balance": 0.0, "load_balance_scope": "model", "z_loss": 0.0}}

    def router_fields(self, config: dict) -> dict:
        groups = config.get("n_group") or 1
        return {"kind": "sigmoid_bias", "normalize": bool(config.get("norm_topk_prob", False)), "groups": groups,
                "top_groups": config.get("topk_group") or groups, "scale": float(config.get("routed_scaling_factor", 1.0))}

    def shared_expert_fields(self, config: dict) -> dict:
        count = config.get("n_shared_experts") or 0
        return {"shared_experts": {"count": 1, "hidden": count * config["moe_intermediate_size"]}} if count else {}

    def moe_names(self) -> dict[str, str]:
        return {"mlp.gate.weight": ROUTER + "weight", "mlp.gate.e_score_correction_bias": ROUTER + "selection_bias"} | prefixed(
            "mlp.shared_experts.", "moe.shared.", SHARED_SWIGLU)

    def check_moe(self, ffn, path, refuse) -> None:
        shared = ffn.shared_experts
        if shared is None or shared.count != 1 or shared.gate or (shared.hidden or ffn.expert.hidden) % ffn.expert.hidden:
            refuse(f"{path}.shared_experts", "one ungated shared expert whose hidden size is a multiple of the experts' "
                   "(n_shared_experts * moe_intermediate_size)")

    def moe_config_fields(self, moe, decoder) -> dict:
        router, shared = moe.router, moe.shared_experts
        first = decoder.moe_layers.index(True)
        if any(not has for has in decoder.moe_layers[first:]):
            raise_not_exportable("model.blocks", f"{self.architecture} has its dense layers first (first_k_dense_replace), then MoE")
        return {"moe_intermediate_size": moe.expert.hidden, "n_shared_experts": (shared.hidden or moe.expert.hidden) // moe.expert.hidden,
                "n_group": router.groups, "topk_group": router.top_groups, "routed_scaling_factor": router.scale,
                "norm_topk_prob": router.normalize, "first_k_dense_replace": first}


def raise_not_exportable(path: str, why: str):
    from moec.interop.errors import NotExportable

    raise NotExportable(f"{path}: {why}")


class DeepseekV3(GroupRouted):
    name, architecture = "deepseek_v3", "DeepseekV3ForCausalLM"
    reads = frozenset(GROUP_ROUTED_READS + "q_lora_rank kv_lora_rank qk_nope_head_dim qk_rope_head_dim v_head_dim qk_head_dim "
                                           "rope_interleave".split())
    attention_kind, windows_and_yarn, mtp_layers = "mla", True, True

    def check_config(self, config: dict) -> None:
        super().check_config(config)
        heads = config.get("num_attention_heads")
        need(config, "num_key_value_heads", lambda v: v is None or v == heads, "MLA has no grouped keys (num_key_value_heads = heads)")
        need(config, "head_dim", lambda v: v is None or v == config.get("qk_rope_head_dim"), "HF sets it to qk_rope_head_dim")
        need(config, "qk_head_dim", lambda v: v is None or v == config.get("qk_nope_head_dim", 0) + config.get("qk_rope_head_dim", 0),
             "HF sets it to qk_nope_head_dim + qk_rope_head_dim")
        need(config, "rope_parameters", lambda v: v is None or v.get("rope_type", "default") == "default" and set(v) <= {"rope_type", "rope_theta"}
             or v.get("rope_type") == "yarn" and set(v) <= YARN_KEYS, "plain RoPE or YaRN (with DeepSeek's mscale)")

    def attention_layer(self, config: dict) -> dict:
        rope = rope_section(config) | {"interleave": bool(config.get("rope_interleave", True))}
        params = config.get("rope_parameters") or {}
        if "scaling" in rope:  # YaRN, with DeepSeek's mscale when given
            rope["scaling"] |= {key: float(params[key]) for key in ("mscale", "mscale_all_dim") if params.get(key) is not None}
        layer = {"kind": "mla", "heads": config["num_attention_heads"], "q_lora_rank": config.get("q_lora_rank") or 0,
                 "kv_lora_rank": config["kv_lora_rank"], "qk_nope_head_dim": config["qk_nope_head_dim"],
                 "qk_rope_head_dim": config["qk_rope_head_dim"], "v_head_dim": config["v_head_dim"], "rope": rope}
        return layer | ({"bias": True} if config.get("attention_bias") else {})

    def attention_table(self) -> dict[str, str]:
        return {f"{hf}.{leaf}": f"{ours}.{leaf}" for hf, ours in MLA_NAMES.items() for leaf in ("weight", "bias")
                if leaf == "weight" or "norm" not in hf}

    def claims(self, attention, moe) -> bool:
        """MLA attention with a group-limited sigmoid router (hf_export picks the candidates by attention and router kind)."""
        return getattr(attention, "kind", None) == "mla"

    def check_attention(self, attention, path, refuse) -> None:
        if attention.norm_eps != 1e-6:
            refuse(f"{path}.norm_eps", "HF's MLA latent norms use eps 1e-6")

    def attention_config(self, attention) -> dict:
        rope = attention.rope
        parameters = {"rope_type": "default", "rope_theta": rope.theta}
        if rope.scaling is not None:
            yarn = rope.scaling
            parameters = {"rope_type": "yarn", "rope_theta": rope.theta, "factor": yarn.factor,
                          "original_max_position_embeddings": yarn.original_max_seq_len, "beta_fast": yarn.beta_fast,
                          "beta_slow": yarn.beta_slow, "truncate": yarn.truncate}
            parameters |= {key: getattr(yarn, key) for key in ("mscale", "mscale_all_dim") if getattr(yarn, key) is not None}
        return {"num_key_value_heads": attention.heads, "q_lora_rank": attention.q_lora_rank or None,
                "kv_lora_rank": attention.kv_lora_rank, "qk_nope_head_dim": attention.qk_nope_head_dim,
                "qk_rope_head_dim": attention.qk_rope_head_dim, "v_head_dim": attention.v_head_dim,
                "rope_interleave": rope.interleave, "rope_parameters": parameters}

    def config_fields(self, decoder) -> dict:
        return {"attention_bias": decoder.attention.bias, "num_nextn_predict_layers": 0}


FAMILY = DeepseekV3()
