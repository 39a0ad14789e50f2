"""The base model and the bounded scalar types every spec section uses."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

# Upper bounds reject absurd specs (10**12 experts) before anything is allocated.
MAX_DIM = 1 << 20  # widths: d_model, hidden sizes, vocab
MAX_COUNT = 1 << 16  # counts: experts, heads, layers, mesh axis sizes
MAX_STEPS = 1 << 40

PosInt = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]
NonNegInt = Annotated[int, Field(ge=0, le=MAX_STEPS)]
Prob = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegFloat = Annotated[float, Field(ge=0.0, le=1e6)]
PosFloat = Annotated[float, Field(gt=0.0, le=1e12)]


class Base(BaseModel):
    """Strict, closed, immutable: unknown keys are errors and nothing is coerced."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, validate_default=True)


def field_error(field: str, message: str, **values: object) -> PydanticCustomError:
    """An error from a model validator that points at one of the model's fields.

    ``moec.schema.validate`` appends ``field`` to the error location, so the message
    lands on the offending key's line instead of the enclosing mapping.
    """
    return PydanticCustomError("moec_field", message, {"field": field, **values})
