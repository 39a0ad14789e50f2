"""Mixtral (``MixtralForCausalLM``): the plain MoE family, the default export of an MoE spec.

Its MoE module is ``block_sparse_moe`` (``mlp`` in transformers v5's memory, read too), experts
``w1`` / ``w3`` / ``w2``; the router always renormalises the top-k weights; no attention bias;
every layer is MoE; a config's ``sliding_window`` acts whenever set, so it is refused.
"""

from moec.interop.families.base import COMMON_READS, MOE_READS, ROUTER, Family, need
from moec.interop.families.experts import PerExpertLayout


class Mixtral(Family):
    name, architecture = "mixtral", "MixtralForCausalLM"
    reads = frozenset(COMMON_READS + MOE_READS + ["sliding_window", "router_jitter_noise"])
    moe, expert_count_key = True, "num_local_experts"
    expert_layout = PerExpertLayout(("block_sparse_moe", "mlp"), {"w1": "w_gate", "w3": "w_up", "w2": "w_down"})
    attention_bias, dense_layers = False, False

    def check_config(self, config: dict) -> None:
        need(config, "sliding_window", lambda v: v is None, "sliding-window attention is not implemented for this family")
        super().check_config(config)

    def router_fields(self, config: dict) -> dict:
        return {"kind": "topk", "normalize": True}

    def moe_names(self) -> dict[str, str]:
        return {"block_sparse_moe.gate.weight": ROUTER + "weight"}

    def import_aliases(self, has_moe: bool) -> dict[str, str]:
        return {"mlp.gate.weight": ROUTER + "weight"} if has_moe else {}

    def claims(self, attention, moe) -> bool:
        """MoE without sinks, q/k norm or shared experts."""
        return not attention.sinks and moe is not None and attention.qk_norm is None and moe.shared_experts is None

    def check_moe(self, ffn, path, refuse) -> None:
        if not ffn.router.normalize:
            refuse(f"{path}.router.normalize", "Mixtral always renormalises the top-k weights")

    def config_fields(self, decoder) -> dict:
        return {}


FAMILY = Mixtral()
