"""Qwen2-MoE (``Qwen2MoeForCausalLM``): q/k/v biases, one gated shared expert per MoE layer, dense
layers where ``decoder_sparse_step`` / ``mlp_only_layers`` say so, ``norm_topk_prob`` optional.

``QWEN_MOE_READS`` and ``sparse_config_fields`` are shared with Qwen3-MoE.
"""

from moec.interop.families.base import COMMON_READS, MOE_READS, SHARED_SWIGLU, Family, prefixed
from moec.interop.families.experts import MLP_EXPERTS
from moec.interop.families.qwen2 import qkv_bias_fields

QWEN_MOE_READS = COMMON_READS + MOE_READS + ("sliding_window use_sliding_window layer_types decoder_sparse_step mlp_only_layers "
                                             "moe_intermediate_size norm_topk_prob").split()


def sparse_config_fields(moe, decoder) -> dict:
    """Which layers are dense (as ``mlp_only_layers``), the expert size and renormalisation."""
    return {"moe_intermediate_size": moe.expert.hidden, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, has in enumerate(decoder.moe_layers) if not has], "norm_topk_prob": moe.router.normalize}


class Qwen2Moe(Family):
    name, architecture = "qwen2_moe", "Qwen2MoeForCausalLM"
    reads = frozenset(QWEN_MOE_READS + ["qkv_bias", "shared_expert_intermediate_size"])
    moe, expert_count_key, expert_layout = True, "num_experts", MLP_EXPERTS
    attention_bias, shared_experts = "qkv", True

    def attention_fields(self, config: dict) -> dict:
        return qkv_bias_fields(config)

    def shared_expert_fields(self, config: dict) -> dict:
        hidden = config.get("shared_expert_intermediate_size")
        return {"shared_experts": {"count": 1, "hidden": hidden, "gate": True}} if hidden else {}

    def moe_names(self) -> dict[str, str]:
        return super().moe_names() | prefixed("mlp.shared_expert.", "moe.shared.", SHARED_SWIGLU) | {
            "mlp.shared_expert_gate.weight": "moe.shared_gate.weight"}

    def claims(self, attention, moe) -> bool:
        """MoE with shared experts, without sinks or q/k norm."""
        return not attention.sinks and moe is not None and attention.qk_norm is None and moe.shared_experts is not None

    def check_moe(self, ffn, path, refuse) -> None:
        shared = ffn.shared_experts
        if shared is None or shared.count != 1 or not shared.gate:
            refuse(f"{path}.shared_experts", "Qwen2-MoE has one gated shared expert in every MoE layer")

    def config_fields(self, decoder) -> dict:
        return {"qkv_bias": True}

    def moe_config_fields(self, moe, decoder) -> dict:
        return sparse_config_fields(moe, decoder) | {"shared_expert_intermediate_size": moe.shared_experts.hidden}


FAMILY = Qwen2Moe()
