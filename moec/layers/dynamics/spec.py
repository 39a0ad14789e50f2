"""The spec of a ``dynamics`` layer: INL dynamics with a velocity state carried through the blocks."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from moec.layers.fields import LayerName
from moec.schema.base import Base, Dim, PosFloat, field_error


OpenUnit = Annotated[float, Field(gt=0.0, lt=1.0)]


class Dynamics(Base):
    """INL dynamics (the complexity seed's ``h, velocity = dynamics(h, velocity)``): a velocity state carried
    through the blocks. It updates the residual stream itself, so the block's norm and residual do not wrap it.

    A controller MLP on [h, v] gives alpha = sigmoid, beta = min(softplus, beta_max), gate = sigmoid;
    v' = clamp(alpha * v - beta * (h - mu), -velocity_limit, velocity_limit); h' = h + dt * gate * v'.
    The first dynamics layer starts from v = 0. docs/semantics.md defines it.
    """

    kind: Literal["dynamics"]
    name: LayerName | None = None
    controller_hidden: Dim = Field(64, description="Width of the controller MLP (silu) on [h, v].")
    dt: PosFloat = Field(0.1, description="Step of the position update h + dt * gate * v'.")
    beta_max: PosFloat = Field(2.0, description="beta = min(softplus(.), beta_max).")
    velocity_limit: PosFloat = Field(10.0, description="v' is clamped to [-velocity_limit, velocity_limit].")
    init_alpha: OpenUnit = Field(0.9, description="Initial alpha: the controller's output bias starts at logit(init_alpha).")
    init_beta: PosFloat = Field(0.1, description="Initial beta: the bias starts at softplus^-1(init_beta).")
    init_gate: OpenUnit = Field(0.5, description="Initial gate: the bias starts at logit(init_gate).")

    @model_validator(mode="after")
    def _beta_fits(self) -> "Dynamics":
        if self.init_beta >= self.beta_max:
            raise field_error("init_beta", f"must be below beta_max ({self.beta_max}), got {self.init_beta}")
        return self
