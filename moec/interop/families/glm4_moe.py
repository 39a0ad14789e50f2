"""GLM-4.5-MoE (``Glm4MoeForCausalLM``): grouped-query attention with q/k/v biases (``attention_bias``), an optional
per-head q/k RMSNorm (``use_qk_norm``), and DeepSeek-V3's MoE layers (``deepseek_v3.GroupRouted``).

GLM-4.5 rotates only part of each head (``partial_rotary_factor``, 0.5 in its configs; HF reads it from
``rope_parameters``, older configs have it at the top level): the spec's ``rope.fraction``.
"""

from moec.interop.families.base import QK_NORM, need, rope_parameters, rope_section
from moec.interop.families.deepseek_v3 import GROUP_ROUTED_READS, GroupRouted

PLAIN_ROPE = {"rope_type", "rope_theta", "partial_rotary_factor"}


def rotary_fraction(config: dict) -> float:
    """HF's partial_rotary_factor: from rope_parameters (what transformers' GLM-4.5 reads), else the top level."""
    params = config.get("rope_parameters") or {}
    value = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    return 1.0 if value is None else float(value)


class Glm4Moe(GroupRouted):
    name, architecture = "glm4_moe", "Glm4MoeForCausalLM"
    reads = frozenset(GROUP_ROUTED_READS + ["use_qk_norm", "partial_rotary_factor"])
    attention_bias, qk_norm, partial_rotary = (False, "qkv"), (None, "head"), True

    def check_config(self, config: dict) -> None:
        super().check_config(config)
        need(config, "rope_parameters", lambda v: v is None or v.get("rope_type", "default") == "default" and set(v) <= PLAIN_ROPE,
             "only plain RoPE (rope_type 'default') is implemented for this family")
        need(config, "partial_rotary_factor", lambda v: v is None or 0 < float(v) <= 1, "a fraction of each head in (0, 1]")

    def attention_fields(self, config: dict) -> dict:
        fields = {"bias": "qkv"} if config.get("attention_bias") else {}
        fraction = rotary_fraction(config)  # the spec refuses a fraction that leaves no even whole number of dims
        fields |= {"rope": rope_section(config) | {"fraction": fraction}} if fraction != 1.0 else {}
        return fields | ({"qk_norm": {"scope": "head", "eps": config["rms_norm_eps"]}} if config.get("use_qk_norm") else {})

    def attention_config(self, attention) -> dict:
        config = super().attention_config(attention)
        config["rope_parameters"] = rope_parameters(attention.rope) | {"partial_rotary_factor": attention.rope.fraction}
        return config

    def attention_names(self) -> dict[str, str]:
        return QK_NORM

    def claims(self, attention, moe) -> bool:
        """Plain attention with a group-limited sigmoid router (hf_export picks the candidates by attention and router kind)."""
        return getattr(attention, "kind", None) == "attention" and getattr(getattr(moe, "router", None), "kind", None) == "sigmoid_bias"

    def config_fields(self, decoder) -> dict:
        attention = decoder.attention
        return {"attention_bias": attention.bias == "qkv", "use_qk_norm": attention.qk_norm is not None,
                "partial_rotary_factor": attention.rope.fraction, "num_nextn_predict_layers": 0}


FAMILY = Glm4Moe()
