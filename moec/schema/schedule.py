"""The ``schedule`` section: precision, compilation, kernel choice, tiles, checkpointing."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from moec.schema.base import Base, PosInt, field_error

DType = Literal["fp32", "bf16", "fp16"]
Compute = Literal["fp32", "bf16", "fp16", "fp8"]


class Precision(Base):
    """Storage and arithmetic dtypes."""

    params: DType = Field("fp32", description="Master weights.")
    compute: Compute = Field("fp32", description=(
        "Matmuls and activations (autocast). fp8: the attention and MLP projections (nn.Linear) run rowwise-scaled "
        "fp8 GEMMs through torchao's float8 training (torchtitan's H100 recipe; CUDA compute capability >= 8.9, "
        "emulated on the CPU; needs moec[fp8]); everything else, routed experts included, runs in bf16 autocast."))
    accumulate: Literal["fp32", "bf16"] = Field(
        "fp32", description="Matmul accumulators: fp32 also turns off cuBLAS's reduced-precision split-K reductions; "
        "bf16 is refused (torch cannot be asked for bf16 accumulators).")
    reduce: DType = Field("fp32", description="Gradient reduction across data-parallel ranks: FSDP2's reduce_dtype; "
                          "without FSDP only the parameters' dtype.")

    @model_validator(mode="after")
    def _accumulate_not_narrower(self) -> "Precision":
        if self.compute == "fp32" and self.accumulate != "fp32":
            raise field_error("accumulate", "cannot be narrower than compute (fp32)")
        return self


class Compile(Base):
    """``torch.compile`` options."""

    enabled: bool = True
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    fullgraph: bool = True
    dynamic: bool = False
    backend: Literal["inductor", "aot_eager", "eager"] = "inductor"

    @model_validator(mode="after")
    def _no_options_when_off(self) -> "Compile":
        if not self.enabled:
            # Non-default values only: the resolved form of a spec sets every field.
            ignored = sorted(name for name in self.model_fields_set - {"enabled"}
                             if getattr(self, name) != type(self).model_fields[name].default)
            if ignored:
                raise field_error(ignored[0], "is ignored because compile.enabled is false; remove it or enable compilation")
        return self


class Kernels(Base):
    """Implementation choice per fused op; ``auto`` picks the best one the device supports."""

    moe: Literal["auto", "eager", "grouped_mm", "bmm", "triton"] = Field(
        "auto", description=("auto: the fastest of the kernels that can serve each MoE layer, timed once on the device, dtype "
                             "and shapes of the run and cached on disk (see measure); bmm needs capacity mode; triton: moec's "
                             "Triton grouped GEMMs (CUDA, or the Triton interpreter), needs the triton package."))
    measure: bool = Field(
        True, description=("kernels.moe auto only. true: time the candidate kernels once per device, dtype and layer shape and "
                           "keep the fastest (cached beside the compile artifacts; a second build reads it); false: the fixed "
                           "rule, the same program on every machine: grouped_mm when dropless, bmm with capacity."))
    spectral_moe: Literal["auto", "fft", "dft"] = Field("auto", description="dft: a matmul with the DFT matrix (short sequences).")
    attention: Literal["auto", "sdpa", "eager"] = Field("auto", description="auto and sdpa: torch SDPA; eager: written out.")

    @model_validator(mode="after")
    def _measure_needs_auto(self) -> "Kernels":
        if not self.measure and self.moe != "auto":
            raise field_error("measure", f"is read only by kernels.moe auto (moe is {self.moe!r}); remove it")
        return self


def _power_of_two(low: int, high: int):
    return Annotated[int, Field(ge=low, le=high, description=f"A power of two in [{low}, {high}].")]


class Tiles(Base):
    """Tile hints for Triton kernels."""

    BM: _power_of_two(16, 256) = 128
    BN: _power_of_two(16, 256) = 128
    BK: _power_of_two(16, 128) = 32
    warps: _power_of_two(1, 16) = 4
    stages: Annotated[int, Field(ge=1, le=8)] = 3

    @model_validator(mode="after")
    def _powers_of_two(self) -> "Tiles":
        for name in ("BM", "BN", "BK", "warps"):
            value = getattr(self, name)
            if value & (value - 1):
                raise field_error(name, f"must be a power of two, got {value}")
        return self


class ActivationCheckpointing(Base):
    """Recompute activations in the backward pass to save memory."""

    mode: Literal["none", "full", "selective"] = Field(
        "none", description="full: keep only each checkpointed block's inputs; selective: keep matmul and attention outputs, "
        "recompute the rest.")
    every: PosInt = Field(1, description="Checkpoint every n-th block: blocks i with (i + 1) % every == 0.")


class Schedule(Base):
    """How the model is executed; never what it computes."""

    precision: Precision = Field(default_factory=Precision)
    compile: Compile = Field(default_factory=Compile)
    kernels: Kernels = Field(default_factory=Kernels)
    tiles: Tiles | None = Field(None, description="Tile sizes of the Triton kernels (kernels.moe: triton); absent: autotuned, cached on disk.")
    activation_checkpointing: ActivationCheckpointing = Field(default_factory=ActivationCheckpointing)
    deterministic: bool = Field(False, description="Fixed reduction orders and deterministic algorithms.")

    @model_validator(mode="after")
    def _tiles_need_triton(self) -> "Schedule":
        if self.tiles is not None and self.kernels.moe != "triton":
            raise field_error("tiles", "are read only by the Triton kernels; set kernels.moe: triton or remove them")
        return self
