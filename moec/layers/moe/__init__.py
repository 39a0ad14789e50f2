"""The ``moe`` layer kind: a token-routed mixture of experts (routers and activations: ``moec.moe``)."""

from moec.layers.kind import LayerKind, TpWeights
from moec.layers.moe.cost import moe_flops, moe_params
from moec.layers.moe.lower import lower_moe
from moec.layers.moe.spec import Moe, resolve_moe

# The stacked [E, ...] expert weights; a spectral_moe layer's MoE has the same.
EXPERT_TP_GROUPS = {
    "experts.up": TpWeights(("experts.w_gate_up", "experts.w_up", "experts.b_gate_up", "experts.b_up"), split="column"),
    "experts.down": TpWeights(("experts.w_down", "experts.b_down"), split="row"),
}

KIND = LayerKind(
    spec=Moe,
    resolve=resolve_moe,
    lower=lower_moe,
    params=moe_params,
    flops={"moe": moe_flops},
    tp_groups=EXPERT_TP_GROUPS,
)

__all__ = ["EXPERT_TP_GROUPS", "KIND", "Moe"]
