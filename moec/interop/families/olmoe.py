"""OLMoE (``OlmoeForCausalLM``): RMSNorm of the whole q and k projections (``qk_norm.scope:
projection``), every layer MoE, ``norm_topk_prob`` optional, ``clip_qkv`` refused."""

from moec.interop.families.base import COMMON_READS, MOE_READS, QK_NORM, Family
from moec.interop.families.experts import MLP_EXPERTS


class Olmoe(Family):
    name, architecture = "olmoe", "OlmoeForCausalLM"
    reads = frozenset(COMMON_READS + MOE_READS + ["attention_bias", "clip_qkv", "norm_topk_prob"])
    moe, expert_count_key, expert_layout = True, "num_experts", MLP_EXPERTS
    qk_norm, dense_layers = "projection", False

    def attention_fields(self, config: dict) -> dict:
        return super().attention_fields(config) | {"qk_norm": {"scope": "projection", "eps": config["rms_norm_eps"]}}

    def attention_names(self) -> dict[str, str]:
        return QK_NORM

    def claims(self, attention, moe) -> bool:
        """MoE with whole-projection q/k norm, without sinks."""
        return not attention.sinks and moe is not None and attention.qk_norm is not None and attention.qk_norm.scope == "projection"

    def moe_config_fields(self, moe, decoder) -> dict:
        return {"norm_topk_prob": moe.router.normalize}


FAMILY = Olmoe()
