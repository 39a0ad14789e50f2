"""The spec's dtype names (``schedule.precision``: ``fp32``, ``bf16``, ``fp16``): the one table of their torch
dtypes, from which their sizes, their source spelling and the compute dtype's autocast follow."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}


def autocast(compute: str, device_type: str):
    """``torch.autocast`` in ``schedule.precision.compute``'s dtype on ``device_type``; no context for fp32."""
    if compute == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[compute])
