"""Triton kernels for the MoE layer (``schedule.kernels.moe: triton``).

Importing this package never needs Triton or a GPU: ``AVAILABLE`` says whether Triton is
installed, and the kernels (``kernels.py``) are imported on the first call. On a CPU the
kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``, how CI tests them).
"""

from __future__ import annotations

import importlib.util
import os

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None


def usable_on(device_type: str) -> bool:
    """Whether the kernels can run on tensors of this device type here."""
    return AVAILABLE and (device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def grouped_linear(x, w, counts, order=None, top_k: int = 1, tiles=None):
    """``F.linear`` per expert group (``counts`` int32 rows each), the rows gathered from ``x`` by
    ``order // top_k`` when given (ops.py)."""
    if not usable_on(x.device.type):
        raise RuntimeError(f"kernels.moe 'triton' runs on CUDA GPUs, or on the CPU under TRITON_INTERPRET=1 (tensors on {x.device}"
                           f"{', triton is not installed' if not AVAILABLE else ''})")
    from moec.backends.triton.ops import grouped_linear as run

    if torch.is_autocast_enabled(x.device.type):  # custom ops see no autocast: cast as torch's GEMMs would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    return run(x, w, counts, order, top_k, tiles)
