"""What ``schedule.precision.compute: fp8`` needs, refused here with the field to change.

fp8 runs the projections (the generated model's ``nn.Linear`` modules) through torchao's float8
training with rowwise scales (``moec.backends.parallel.float8``): torchao must be installed
(``moec[fp8]``); ``torch._scaled_mm`` takes widths that are multiples of 16, and every projection
reads or writes the model width; the master weights are fp32 or bf16 (torchao casts from those).
Combinations the conversion is not wired into yet are refused by name: tensor parallelism (torchao's
float8 DTensor plans) and pipeline parallelism (the stages are cut before the conversion would run).
Projections narrower than 16 elsewhere (an MLA rank of 40) stay bf16 and are named in ``parallel.py``.
The device (CUDA compute capability >= 8.9, or the CPU's emulation) is checked at launch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

from moec.dtypes import FP8_MULTIPLE

Finding = tuple[tuple, str]
COMPUTE = ("schedule", "precision", "compute")


def precision_checks() -> tuple:
    return (_fp8_installed, _fp8_widths, _fp8_master_weights, _fp8_parallelism)


def _fp8(spec) -> bool:
    return spec.schedule.precision.compute == "fp8"


def _fp8_installed(spec) -> Iterator[Finding]:
    if _fp8(spec) and importlib.util.find_spec("torchao") is None:
        yield COMPUTE, "'fp8' needs torchao's float8 training (pip install 'moec[fp8]'); use 'bf16' without it"


def _fp8_widths(spec) -> Iterator[Finding]:
    d = spec.model.d_model
    if _fp8(spec) and d % FP8_MULTIPLE:
        yield ("model", "d_model"), (f"must be a multiple of {FP8_MULTIPLE} for fp8 GEMMs, got {d} (schedule.precision.compute: "
                                     "fp8; torch._scaled_mm's widths)")


def _fp8_master_weights(spec) -> Iterator[Finding]:
    params = spec.schedule.precision.params
    if _fp8(spec) and params == "fp16":
        yield ("schedule", "precision", "params"), ("fp16 master weights cannot feed torchao's fp8 casts "
                                                    "(compute: fp8); use fp32 or bf16")


def _fp8_parallelism(spec) -> Iterator[Finding]:
    if not _fp8(spec):
        return
    axes = spec.mesh.axes
    tensor, pipeline = spec.sharding.tensor, spec.sharding.pipeline
    if tensor is not None and axes.get(tensor.axis, 1) > 1:
        yield COMPUTE, ("'fp8' is not wired into tensor parallelism yet (sharding.tensor splits the projections that fp8 "
                        "converts); use 'bf16' or drop sharding.tensor")
    if pipeline is not None and axes.get(pipeline.axis, 1) > 1:
        yield COMPUTE, ("'fp8' is not wired into pipeline parallelism yet (the stages are cut before the fp8 conversion "
                        "would run); use 'bf16' or drop sharding.pipeline")
