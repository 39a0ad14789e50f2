"""Checks that every ``schedule`` and ``sharding`` option the runtime cannot honour is refused here.

Each yields ``(key_path, message)`` like the checks in ``moec.schema.checks``. Whole features that
the seed specs plan for but moec does not execute yet (tensor parallelism's vocab split) validate,
and ``moec train`` refuses them at launch (``UNSUPPORTED`` in the generated parallel.py); an option
that nothing would ever read is refused here. What tensor parallelism cannot split is checked in
``moec.schema.checks_tensor``.
"""

from __future__ import annotations

import math
from typing import Iterator

Finding = tuple[tuple, str]


def schedule_checks() -> tuple:
    return (_activation_checkpointing, _accumulation, _gradient_reduction, _pipeline_schedule)


def _axis_size(spec, axes) -> int:
    return math.prod(spec.mesh.axes.get(axis, 1) for axis in axes)


def _activation_checkpointing(spec) -> Iterator[Finding]:
    ac, blocks = spec.schedule.activation_checkpointing, spec.model.num_layers
    if ac.mode == "none" and ac.every != 1:
        yield ("schedule", "activation_checkpointing", "every"), "is used only with mode full or selective (mode is none)"
    elif ac.every > blocks:
        yield ("schedule", "activation_checkpointing", "every"), (f"checkpoints every {ac.every}th block, but the model has "
                                                                   f"{blocks} block(s): none would be checkpointed")


def _accumulation(spec) -> Iterator[Finding]:
    """fp32 accumulation is what the trainer sets (moec.train.precision); torch has no switch for bf16 accumulators."""
    if spec.schedule.precision.accumulate != "fp32":
        yield ("schedule", "precision", "accumulate"), ("bf16 accumulation cannot be requested from torch (CPU matmuls always "
                                                        "accumulate in fp32; CUDA only allows reduced-precision split-K "
                                                        "reductions); use fp32")
    elif spec.schedule.precision.params != "fp32" and spec.train.grad_accum > 1:
        # gradients of micro-batches add up in .grad, in the parameters' dtype: fp32 accumulation needs fp32 parameters
        yield ("schedule", "precision", "params"), (f"{spec.schedule.precision.params} parameters accumulate the gradients of "
                                                    f"train.grad_accum ({spec.train.grad_accum}) micro-batches in "
                                                    f"{spec.schedule.precision.params}, but precision.accumulate is fp32; "
                                                    "use params: fp32 (with compute: bf16 for speed) or grad_accum: 1")


def _gradient_reduction(spec) -> Iterator[Finding]:
    """precision.reduce is FSDP2's reduce dtype; without FSDP nothing reduces gradients in another dtype."""
    precision, sharding = spec.schedule.precision, spec.sharding
    path = ("schedule", "precision", "reduce")
    if _axis_size(spec, sharding.batch) == 1:
        if precision.reduce != "fp32":  # the default, whatever the parameters' dtype
            yield path, "is used only with data parallelism (sharding.batch over an axis larger than 1)"
    elif _axis_size(spec, sharding.fsdp) == 1 and precision.reduce != precision.params:
        yield path, (f"{precision.reduce} gradient reduction needs FSDP (sharding.fsdp): DDP and expert parallelism without "
                     f"FSDP reduce gradients in the parameters' dtype ({precision.params})")


def _pipeline_schedule(spec) -> Iterator[Finding]:
    """What torch.distributed.pipelining's schedules need (moec.train.pipeline_step runs them)."""
    pipeline = spec.sharding.pipeline
    if pipeline is None or pipeline.axis not in spec.mesh.axes:
        return
    ranks, micro = spec.mesh.axes[pipeline.axis], pipeline.microbatches
    if ranks == 1:  # one stage: microbatches and schedule would do nothing
        yield ("sharding", "pipeline", "axis"), (f"axis '{pipeline.axis}' has size 1: nothing is pipelined, so microbatches "
                                                 "and schedule would be ignored; remove sharding.pipeline (train.grad_accum "
                                                 "splits a step into micro-batches)")
    elif pipeline.schedule == "interleaved_1f1b":
        if spec.model.num_layers < 2 * ranks:
            yield ("sharding", "pipeline", "schedule"), (f"interleaved_1f1b runs 2 stages per rank, {2 * ranks} in all, but the "
                                                         f"model has {spec.model.num_layers} block(s)")
        rounds = max(1, micro // ranks)
        if micro % rounds:
            yield ("sharding", "pipeline", "microbatches"), (f"interleaved_1f1b needs a multiple of its {rounds} rounds "
                                                             f"(microbatches // {ranks} ranks), got {micro}")
    elif pipeline.schedule == "1f1b" and micro < ranks:
        yield ("sharding", "pipeline", "microbatches"), (f"1f1b needs at least one microbatch per stage ({ranks}), got {micro}; "
                                                         "raise it or use gpipe")
