"""Qwen2 (``Qwen2ForCausalLM``), dense: Llama with biases on q, k and v only (``attention.bias: qkv``).

Its ``sliding_window`` acts only with ``use_sliding_window``, which is refused when true.
"""

from moec.interop.families.base import COMMON_READS, Family


def qkv_bias_fields(config: dict) -> dict:
    """Qwen2's q/k/v biases (``qkv_bias``, read by Qwen2-MoE; always on in Qwen2)."""
    return {"bias": "qkv"} if config.get("qkv_bias", True) else {}


class Qwen2(Family):
    name, architecture = "qwen2", "Qwen2ForCausalLM"
    reads = frozenset(COMMON_READS + ["sliding_window", "use_sliding_window", "layer_types"])
    attention_bias = "qkv"

    def attention_fields(self, config: dict) -> dict:
        return qkv_bias_fields(config)

    def claims(self, attention, moe) -> bool:
        """Dense, with q/k/v-only biases and no sinks."""
        return not attention.sinks and moe is None and attention.bias == "qkv"

    def config_fields(self, decoder) -> dict:
        return {}


FAMILY = Qwen2()
