"""The ``mlp`` layer kind: a dense feed-forward network."""

from moec.layers.kind import LayerKind, TpWeights
from moec.layers.mlp.cost import mlp_params
from moec.layers.mlp.lower import lower_mlp
from moec.layers.mlp.spec import Mlp, resolve_mlp

KIND = LayerKind(
    spec=Mlp,
    resolve=resolve_mlp,
    lower=lower_mlp,
    params=mlp_params,
    tp_groups={
        "mlp.up": TpWeights(("w_up", "w_gate"), linear=True, split="column"),
        "mlp.down": TpWeights(("w_down",), linear=True, split="row"),
    },
)

__all__ = ["KIND", "Mlp"]
