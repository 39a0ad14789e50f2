"""The ``spectral_moe`` layer kind: a mixture of experts over the sequence's frequency bins."""

from moec.layers.kind import LayerKind
from moec.layers.moe import EXPERT_TP_GROUPS
from moec.layers.spectral_moe.cost import spectral_moe_flops, spectral_moe_params
from moec.layers.spectral_moe.lower import lower_spectral_moe
from moec.layers.spectral_moe.spec import SpectralMoe, resolve_spectral_moe

KIND = LayerKind(
    spec=SpectralMoe,
    resolve=resolve_spectral_moe,
    lower=lower_spectral_moe,
    params=spectral_moe_params,
    flops={"spectral_moe": spectral_moe_flops},
    tp_groups=EXPERT_TP_GROUPS,
)

__all__ = ["KIND", "SpectralMoe"]
