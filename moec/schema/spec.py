"""The whole spec, and the resolution of derived defaults."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, field_validator
from pydantic_core import PydanticCustomError

from moec.layers import LAYER_KINDS
from moec.schema.base import Base
from moec.schema.model import Model
from moec.schema.parallel import Mesh, Sharding
from moec.schema.schedule import Schedule
from moec.schema.train import Train

SCHEMA_VERSION = 1

# Printable text on one line: a name ends up in file names, headers and run directories.
Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]


class Spec(Base):
    """A moec spec: model, mesh, sharding, schedule and training recipe."""

    version: Literal[1] = Field(description="Schema version of this spec.")
    name: Name
    description: str = ""
    model: Model
    mesh: Mesh = Field(default_factory=Mesh)
    sharding: Sharding = Field(default_factory=Sharding)
    schedule: Schedule = Field(default_factory=Schedule)
    train: Train

    @field_validator("version", mode="before")
    @classmethod
    def _version_is_an_integer(cls, value):
        # Literal[1] alone would take `true` and `1.0` (both == 1): a version is written as 1.
        if type(value) is not int:
            kind = {bool: "a boolean", float: "a number", str: "a string"}.get(type(value), type(value).__name__)
            raise PydanticCustomError("moec_version", "must be the integer 1, got {kind} {value}",
                                      {"kind": kind, "value": repr(value)})
        return value

    # Where the spec came from: set by moec.load_spec, used for `# file:line` provenance.
    _source: object = PrivateAttr(default=None)

    @property
    def source(self):
        """The :class:`moec.schema.loader.LoadedYaml` this spec was read from, if any."""
        return self._source

    def attach_source(self, loaded) -> "Spec":
        """Record where this spec was read from (moec.load_spec does; the model is frozen, its source is not)."""
        self._source = loaded
        return self


def resolve(spec: Spec) -> Spec:
    """Fill every derived default (``null`` in the schema) with its concrete value."""
    data = spec.model_dump(mode="python")
    model = data["model"]
    d_model = model["d_model"]
    for block in model["blocks"]:
        for layer in block["layers"]:
            _resolve_layer(layer, d_model)
    if model["head"]["kind"] == "regression" and model["head"]["out_dims"] is None:
        model["head"]["out_dims"] = model["inputs"]["dims"]
    optimizer = data["train"]["optimizer"]
    for group in ("lr_router", "lr_experts"):
        if optimizer[group] is None:
            optimizer[group] = optimizer["lr"]
    checkpoint = data["train"]["checkpoint"]
    if checkpoint["dir"] is None:
        checkpoint["dir"] = f"runs/{path_safe(spec.name)}"
    return Spec.model_validate(data)


def _resolve_layer(layer: dict, d_model: int) -> None:
    layer["name"] = layer["name"] or layer["kind"]
    LAYER_KINDS[layer["kind"]].resolve(layer, d_model)


def path_safe(name: str, fallback: str = "run") -> str:
    """A spec name as one directory name: letters, digits, '-', '_' and '.' only."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("._")
    return safe or fallback
