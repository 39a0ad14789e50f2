"""The MoE concept in one place: typed attributes, the router and activation registries,
parameter slots, and the decomposition into primitive ops shared by lowering, fusion and
the reference interpreter. Imports nothing of moec but ``moec.ir``."""

from moec.moe.activations import ACTIVATIONS, ActivationKind, is_gated
from moec.moe.attrs import AuxAttrs, CapacityAttrs, ExpertAttrs, MoeAttrs, RouterAttrs, moe_attrs
from moec.moe.decompose import decompose, ffn, placeholders
from moec.moe.params import BAND_TABLE, EXPERT_PREFIX, ROUTER_WEIGHT, SELECTION_BIAS, ParamDecl, expert_slots, ffn_params, ffn_slots, moe_params, moe_slots
from moec.moe.routers import ROUTERS, RouterKind
from moec.moe.spectral import decompose_spectral

__all__ = [
    "ACTIVATIONS", "ActivationKind", "AuxAttrs", "BAND_TABLE", "CapacityAttrs", "EXPERT_PREFIX", "ExpertAttrs", "MoeAttrs", "ParamDecl",
    "ROUTERS", "ROUTER_WEIGHT", "RouterAttrs", "RouterKind", "SELECTION_BIAS", "decompose", "decompose_spectral", "ffn",
    "expert_slots", "ffn_params", "ffn_slots", "is_gated", "moe_attrs", "moe_params", "moe_slots", "placeholders",
]
