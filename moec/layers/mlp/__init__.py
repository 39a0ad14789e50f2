"""The ``mlp`` layer kind: a dense feed-forward network."""

from moec.layers.kind import LayerKind, TpWeights
from moec.layers.mlp.cost import mlp_params
from moec.layers.mlp.lower import lower_mlp
from moec.layers.mlp.spec import Mlp

KIND = LayerKind(
    spec=Mlp,
    lower=lower_mlp,
    params=mlp_params,
    tp_groups={"mlp.up": TpWeights(("w_up", "w_gate"), linear=True), "mlp.down": TpWeights(("w_down",), linear=True)},
)

__all__ = ["KIND", "Mlp"]
