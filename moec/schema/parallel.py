"""The ``mesh`` and ``sharding`` sections: which devices exist and what is split over them."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, model_validator

from moec.layers import TP_GROUPS, default_split
from moec.schema.base import Base, PosInt, field_error

AxisName = Literal["dp", "fsdp", "ep", "tp", "pp", "cp"]
AxisList = Annotated[list[AxisName], Field(max_length=6)]

# Parameter groups that tensor parallelism splits by columns (outputs) or rows (inputs): the layer kinds'
# (moec/layers/<kind>/__init__.py) and the model's embedding and head, as moec.layers.TP_GROUPS lists them.
TpGroup = Literal[tuple(TP_GROUPS)]


class Mesh(Base):
    """A device mesh: named axes whose sizes multiply to ``world_size``."""

    world_size: PosInt = 1
    axes: Annotated[dict[AxisName, PosInt], Field(min_length=1)] = Field(default_factory=lambda: {"dp": 1})

    @model_validator(mode="after")
    def _sizes_multiply(self) -> "Mesh":
        product = math.prod(self.axes.values())
        if product != self.world_size:
            factors = " x ".join(f"{name} {size}" for name, size in self.axes.items())
            raise field_error("world_size", f"mesh axes multiply to {product} ({factors}), but world_size is {self.world_size}")
        return self


class TensorParallel(Base):
    """Megatron-style tensor parallelism over one axis."""

    axis: AxisName
    column: list[TpGroup] = Field(
        default_factory=lambda: default_split("column"), description="Split along output features."
    )
    row: list[TpGroup] = Field(
        default_factory=lambda: default_split("row"), description="Split along input features."
    )
    sequence_parallel: bool = Field(
        False, description="Megatron-SP: between the split groups each rank holds S / tp positions (norms, residuals); "
        "attention, MLA and MLP layers only.")

    @model_validator(mode="after")
    def _column_row_disjoint(self) -> "TensorParallel":
        both = sorted(set(self.column) & set(self.row))
        if both:
            raise field_error("row", f"{', '.join(both)} cannot be split by both columns and rows")
        return self


class Pipeline(Base):
    """Pipeline parallelism: consecutive blocks form one stage per rank of ``axis``."""

    axis: AxisName
    microbatches: PosInt = 1
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"


class Sharding(Base):
    """What each mesh axis splits. Every mesh axis larger than 1 must split something."""

    batch: AxisList = Field(default_factory=list, description="Axes that split the batch (data parallel).")
    sequence: AxisList = Field(default_factory=list, description="The axis that splits every sequence (context parallel): rank r holds chunks r and 2cp-1-r of 2cp; "
        "attention gathers keys and values over it, a spectral_moe layer's rfft runs distributed (all-to-alls over it). "
        "Models of attention, mlp, dropless moe and spectral_moe layers; it may also split the experts.")
    experts: AxisList = Field(default_factory=list, description="Axes that split the expert dimension (expert parallel).")
    fsdp: AxisList = Field(default_factory=list, description="Axes over which FSDP2 shards parameters; each must also split the batch.")
    placement: Literal["contiguous", "consistent_hash"] = Field(
        "contiguous",
        description="Which expert-parallel rank owns each expert: E/ep consecutive experts per rank, or a seeded hash ring "
        "with bounded loads (seed train.seed) that moves only the new rank's share of experts when ep grows by one.",
    )
    tensor: TensorParallel | None = None
    pipeline: Pipeline | None = None
