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


def _require(x: torch.Tensor) -> None:
    if not usable_on(x.device.type):
        raise RuntimeError(f"kernels.moe 'triton' runs on CUDA GPUs, or on the CPU under TRITON_INTERPRET=1 (tensors on {x.device}"
                           f"{', triton is not installed' if not AVAILABLE else ''})")


def _autocast(*tensors):
    """Custom ops see no autocast: cast the GEMM operands as torch's GEMMs would."""
    if not torch.is_autocast_enabled(tensors[0].device.type):
        return tensors
    dtype = torch.get_autocast_dtype(tensors[0].device.type)
    return tuple(t.to(dtype) if t is not None else None for t in tensors)


def grouped_linear(x, w, counts, order=None, top_k: int = 1, tiles=None, bias=None):
    """``F.linear`` per expert group (``counts`` int32 rows each; ``bias`` [E, N] per expert), the rows
    gathered from ``x`` by ``order // top_k`` when given (ops.py)."""
    _require(x)
    from moec.backends.triton.ops import grouped_linear as run

    x, w, bias = _autocast(x, w, bias)
    return run(x, w, counts, order, top_k, tiles, bias)


def grouped_glu(x, w, counts, order, top_k: int, activation: str, tiles=None, limit: float = 0.0, alpha: float = 0.0, bias=None):
    """The first expert projection with ``activation`` (a name of ``moec.moe.ACTIVATIONS``) in its epilogue:
    ``act(x @ w[:, 0].T) * (x @ w[:, 1].T)`` for a gated one, ``w`` the experts' [E, 2, H, D] ``w_gate_up`` read
    in place (``bias`` [E, 2, H]), else ``act(x @ w.T)`` with ``w`` [E, H, D]; a clamped one reads ``limit`` and
    ``alpha`` (glu.py)."""
    _require(x)
    from moec.backends.triton.glu import grouped_glu as run

    x, w, bias = _autocast(x, w, bias)
    return run(x, w, counts, order, top_k, activation, tiles, limit, alpha, bias)


def route(logits, top_k: int, sigmoid: bool, temperature: float, normalize: bool, bias=None, block: int = 0):
    """The fused router: (scores, weights, chosen, per-block expert counts) (routing.py)."""
    _require(logits)
    from moec.backends.triton.routing import route as run

    return run(logits, top_k, sigmoid, temperature, normalize, bias, block)


def permute(group, groups: int, block_counts=None, block_rows: int = 0):
    """(dest, order, totals): the stable sort of rows by group, from counts and prefix sums (routing.py)."""
    _require(group)
    from moec.backends.triton.routing import permute as run

    return run(group, groups, block_counts, block_rows)


def combine(y_sorted, weights, dest, tiles=()):
    """Each token's k expert rows times their weights, summed in choice order (routing.py)."""
    _require(y_sorted)
    from moec.backends.triton.routing import combine as run

    return run(y_sorted, weights, dest, tiles)
