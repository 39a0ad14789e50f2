"""Llama (``LlamaForCausalLM``), dense: the Llama-style defaults of ``Family`` as they are.

Biases on all four attention projections or none (``attention_bias``); MLP biases and
``pretraining_tp`` other than 1 are refused.
"""

from moec.interop.families.base import COMMON_READS, Family


class Llama(Family):
    name, architecture = "llama", "LlamaForCausalLM"
    reads = frozenset(COMMON_READS + ["attention_bias", "mlp_bias", "pretraining_tp"])

    def claims(self, attention, moe) -> bool:
        """Dense, without q/k/v-only biases or sinks."""
        return not attention.sinks and moe is None and attention.bias != "qkv"


FAMILY = Llama()
