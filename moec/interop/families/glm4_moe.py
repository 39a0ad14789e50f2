"""GLM-4.5-MoE (``Glm4MoeForCausalLM``): grouped-query attention with q/k/v biases (``attention_bias``), an optional
per-head q/k RMSNorm (``use_qk_norm``), and DeepSeek-V3's MoE layers (``deepseek_v3.GroupRouted``).

GLM-4.5 rotates only part of each head (``partial_rotary_factor``, 0.5 in its configs): moec's attention rotates
whole heads, so a factor other than 1 is refused by name.
"""

from moec.interop.families.base import QK_NORM, need
from moec.interop.families.deepseek_v3 import GROUP_ROUTED_READS, GroupRouted

PLAIN_ROPE = {"rope_type", "rope_theta", "partial_rotary_factor"}


def whole_heads(value) -> bool:
    return value is None or float(value) == 1.0


class Glm4Moe(GroupRouted):
    name, architecture = "glm4_moe", "Glm4MoeForCausalLM"
    reads = frozenset(GROUP_ROUTED_READS + ["use_qk_norm", "partial_rotary_factor"])
    attention_bias, qk_norm = (False, "qkv"), (None, "head")

    def check_config(self, config: dict) -> None:
        super().check_config(config)
        why = "partial rotary embeddings are not implemented (moec's RoPE rotates whole heads); only 1.0 is accepted"
        need(config, "partial_rotary_factor", whole_heads, why)
        need(config, "rope_parameters", lambda v: v is None or v.get("rope_type", "default") == "default" and set(v) <= PLAIN_ROPE,
             "only plain RoPE (rope_type 'default') is implemented for this family")
        need(config.get("rope_parameters") or {}, "partial_rotary_factor", whole_heads, why)

    def attention_fields(self, config: dict) -> dict:
        fields = {"bias": "qkv"} if config.get("attention_bias") else {}
        return fields | ({"qk_norm": {"scope": "head", "eps": config["rms_norm_eps"]}} if config.get("use_qk_norm") else {})

    def attention_names(self) -> dict[str, str]:
        return QK_NORM

    def claims(self, attention, moe) -> bool:
        """Plain attention with a group-limited sigmoid router (hf_export picks the candidates by attention and router kind)."""
        return getattr(attention, "kind", None) == "attention" and getattr(getattr(moe, "router", None), "kind", None) == "sigmoid_bias"

    def config_fields(self, decoder) -> dict:
        attention = decoder.attention
        return {"attention_bias": attention.bias == "qkv", "use_qk_norm": attention.qk_norm is not None,
                "partial_rotary_factor": 1.0, "num_nextn_predict_layers": 0}


FAMILY = Glm4Moe()
