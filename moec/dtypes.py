"""The spec's dtype names (``schedule.precision``: ``fp32``, ``bf16``, ``fp16``): the one table of their torch
dtypes, from which their sizes, their source spelling and the compute dtype's autocast follow.

``compute: fp8`` is not a storage dtype: the projections' GEMMs run in fp8 (torchao's float8 training,
``moec.backends.parallel.float8``) and everything around them in bf16, so its autocast, FSDP2 parameter dtype
and MFU peak are bf16's."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}
FP8_MULTIPLE = 16  # torch._scaled_mm: both widths of an fp8 GEMM multiples of 16
FP8_SURROUNDINGS = "bf16"  # compute: fp8's dtype outside the fp8 GEMMs


def compute_name(compute: str) -> str:
    """The storage dtype name that ``schedule.precision.compute`` computes in outside fp8 GEMMs."""
    return FP8_SURROUNDINGS if compute == "fp8" else compute


def compute_dtype(compute: str) -> torch.dtype:
    """The torch dtype of autocast and of FSDP2's gathered parameters for ``schedule.precision.compute``."""
    return DTYPES[compute_name(compute)]


def autocast(compute: str, device_type: str):
    """``torch.autocast`` in ``schedule.precision.compute``'s dtype (bf16 for fp8) on ``device_type``; no context for fp32."""
    if compute == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=compute_dtype(compute))
