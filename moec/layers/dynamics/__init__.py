"""The ``dynamics`` layer kind: INL dynamics, a velocity state carried through the blocks."""

from moec.layers.dynamics.cost import dynamics_flops, dynamics_params
from moec.layers.dynamics.lower import lower_dynamics
from moec.layers.dynamics.spec import Dynamics
from moec.layers.kind import LayerKind

# It updates the residual stream itself: its block's norm and residual do not wrap it.
KIND = LayerKind(spec=Dynamics, lower=lower_dynamics, params=dynamics_params, flops={"dynamics": dynamics_flops}, wrapped=False)

__all__ = ["KIND", "Dynamics"]
