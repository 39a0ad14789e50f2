"""The spec of an ``mlp`` layer: a dense feed-forward network."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moec.layers.fields import DEFAULT_HIDDEN, Activation, LayerName, default_hidden, no_dropout
from moec.schema.base import Base, Dim, Prob, field_error


class Mlp(Base):
    """A dense feed-forward layer."""

    kind: Literal["mlp"]
    name: LayerName | None = None
    hidden: Dim | None = Field(None, description=DEFAULT_HIDDEN)
    activation: Activation = "gelu"
    bias: bool = False
    dropout: Prob = Field(0.0, description="Not implemented yet: only 0 is accepted.")

    @model_validator(mode="after")
    def _not_clamped(self) -> "Mlp":
        no_dropout(self.dropout)
        if self.activation == "clamped_swiglu":
            raise field_error("activation", "'clamped_swiglu' is an expert activation (GPT-OSS); use 'swiglu' for a dense layer")
        return self


def resolve_mlp(layer: dict, d_model: int) -> None:
    """Fill the derived defaults of a dumped ``Mlp`` (``moec validate --resolved``)."""
    layer["hidden"] = layer["hidden"] or default_hidden(d_model, layer["activation"])
