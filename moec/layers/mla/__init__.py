"""The ``mla`` layer kind: multi-head latent attention (DeepSeek-V2 / V3) with a latent decode cache."""

from moec.layers.kind import LayerKind
from moec.layers.mla.cost import mla_flops, mla_params
from moec.layers.mla.lower import lower_mla
from moec.layers.mla.spec import Mla, resolve_mla

# No tensor-parallel groups yet: moec.schema.checks_tensor refuses an mla layer under sharding.tensor.
KIND = LayerKind(spec=Mla, resolve=resolve_mla, lower=lower_mla, params=mla_params, flops={"mla_attention": mla_flops})

__all__ = ["KIND", "Mla"]
