"""Qwen3-MoE (``Qwen3MoeForCausalLM``): RMSNorm of each head's q and k (``qk_norm.scope: head``),
no shared expert, dense layers and ``norm_topk_prob`` as in Qwen2-MoE."""

from moec.interop.families.base import QK_NORM, Family
from moec.interop.families.experts import MLP_EXPERTS
from moec.interop.families.qwen2_moe import QWEN_MOE_READS, sparse_config_fields


class Qwen3Moe(Family):
    name, architecture = "qwen3_moe", "Qwen3MoeForCausalLM"
    reads = frozenset(QWEN_MOE_READS + ["attention_bias"])
    moe, expert_count_key, expert_layout = True, "num_local_experts", MLP_EXPERTS
    qk_norm = "head"

    def attention_fields(self, config: dict) -> dict:
        return super().attention_fields(config) | {"qk_norm": {"scope": "head", "eps": config["rms_norm_eps"]}}

    def attention_names(self) -> dict[str, str]:
        return QK_NORM

    def claims(self, attention, moe) -> bool:
        """MoE with per-head q/k norm, without sinks."""
        return not attention.sinks and moe is not None and attention.qk_norm is not None and attention.qk_norm.scope == "head"

    def moe_config_fields(self, moe, decoder) -> dict:
        return sparse_config_fields(moe, decoder)


FAMILY = Qwen3Moe()
