"""The whole spec, and the resolution of derived defaults."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, field_validator
from pydantic_core import PydanticCustomError

from moec.layers.fields import GATED_ACTIVATIONS
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
    if layer["kind"] == "attention":
        layer["kv_heads"] = layer["kv_heads"] or layer["heads"]
        layer["head_dim"] = layer["head_dim"] or max(1, d_model // layer["heads"])
    elif layer["kind"] == "mlp":
        layer["hidden"] = layer["hidden"] or _default_hidden(d_model, layer["activation"])
    elif layer["kind"] == "moe":
        _resolve_moe(layer, d_model)
    elif layer["kind"] == "spectral_moe":
        # Spectral experts see the real view of complex tokens: 2 * d_model channels.
        _resolve_moe(layer["moe"], 2 * d_model)


def _resolve_moe(moe: dict, width: int) -> None:
    expert = moe["expert"]
    expert["hidden"] = expert["hidden"] or _default_hidden(width, expert["activation"])
    if expert["activation"] == "clamped_swiglu":  # GPT-OSS's values
        expert["swiglu_limit"] = expert["swiglu_limit"] or 7.0
        expert["swiglu_alpha"] = expert["swiglu_alpha"] or 1.702
    router = moe["router"]
    if router["kind"] == "sinkhorn" and router["sinkhorn"] is None:
        router["sinkhorn"] = {"iters": 5, "tau": 0.7}
    if router["kind"] == "sigmoid_bias" and router["bias_update_rate"] is None:
        router["bias_update_rate"] = 1e-3
    capacity = moe["capacity"]
    if router["kind"] == "expert_choice":  # see MoeConfig: capacity-based, balanced by construction
        capacity["mode"] = "capacity"
        capacity["factor"] = capacity["factor"] or (1.0 if capacity["tokens"] is None else None)
        router["normalize"] = False
        moe["aux"]["load_balance"] = 0.0
    if router["kind"] == "token_id":  # see MoeConfig: a fixed expert per token id, weight 1, nothing to balance
        router["normalize"] = False
        moe["aux"]["load_balance"] = 0.0
    if capacity["mode"] == "capacity":
        capacity["factor"] = capacity["factor"] or (1.25 if capacity["tokens"] is None else None)
        capacity["drop_policy"] = capacity["drop_policy"] or "zero"
    shared = moe["shared_experts"]
    if shared is not None and shared["hidden"] is None:
        shared["hidden"] = expert["hidden"]


def _default_hidden(width: int, activation: str) -> int:
    # Gated FFNs keep the parameter count of a 4x FFN: 2/3 * 4 * width, rounded up to 8.
    if activation in GATED_ACTIVATIONS:
        return -(-(8 * width // 3) // 8) * 8
    return 4 * width


def path_safe(name: str, fallback: str = "run") -> str:
    """A spec name as one directory name: letters, digits, '-', '_' and '.' only."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("._")
    return safe or fallback
