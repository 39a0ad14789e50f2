"""Tile sizes of the Triton kernels: ``schedule.tiles`` when the spec gives them, else a small
autotune on the first call per (device name, dtype, rows bucket, N, K, E) whose winner is
cached on disk (``$MOEC_CACHE_DIR/triton_tiles.json``, default ``~/.cache/moec``) and reused
by later runs. Under Triton's interpreter (CPU) a fixed small tile is used."""

from __future__ import annotations

import json
import os
from dataclasses import astuple
from pathlib import Path

import torch

from moec.backends.triton.launch import Tile, launch_grouped_gemm


INTERPRETER = Tile(32, 32, 32, 1, 1)
CANDIDATES = (Tile(64, 64, 32, 4, 3), Tile(64, 128, 32, 4, 3), Tile(128, 128, 32, 8, 3), Tile(128, 64, 64, 4, 3),
              Tile(32, 64, 64, 4, 4), Tile(64, 128, 64, 8, 3), Tile(16, 64, 64, 4, 3), Tile(16, 128, 64, 4, 3),
              Tile(32, 128, 64, 4, 3))  # BM 16 / 32: few rows per expert (small batches)
_MEMORY: dict[str, Tile] = {}


def cache_file() -> Path:
    return Path(os.environ.get("MOEC_CACHE_DIR", Path.home() / ".cache" / "moec")) / "triton_tiles.json"


def _key(x: torch.Tensor, w: torch.Tensor, rows: int) -> str:
    bucket = 1 << max(rows - 1, 1).bit_length()  # rows change every step: one entry per power of two
    return f"{torch.cuda.get_device_name(x.device)}|{x.dtype}|{bucket}|{tuple(w.shape)}"


def tile_for(x: torch.Tensor, w: torch.Tensor, rows: int, tiles: list[int]) -> Tile:
    if tiles:
        return Tile(*tiles)
    if x.device.type != "cuda":
        return INTERPRETER
    key = _key(x, w, rows)
    if key not in _MEMORY:
        stored = _load()
        _MEMORY[key] = Tile(*stored[key]) if key in stored else _autotune(x, w, rows, key)
    return _MEMORY[key]


def _load() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _autotune(x: torch.Tensor, w: torch.Tensor, rows: int, key: str) -> Tile:
    """Time the forward kernel with each candidate on this call's shapes (evenly split rows); keep the fastest."""
    import triton.testing

    experts = w.shape[0]
    counts = torch.full((experts,), rows // experts, dtype=torch.int32, device=x.device)
    a = torch.randn(rows, x.shape[1], device=x.device, dtype=x.dtype)
    layout = (w, w.stride(0), w.stride(2), w.stride(1))
    timed = {}
    for tile in CANDIDATES:
        try:
            timed[tile] = triton.testing.do_bench(lambda: launch_grouped_gemm(a, layout, counts, None, 1, rows, w.shape[1], tile), rep=20)
        except Exception:  # a tile that does not fit this GPU's shared memory is skipped
            continue
    best = min(timed, key=timed.get)
    stored = _load()
    stored[key] = list(astuple(best))
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stored, indent=1, sort_keys=True))
    tmp.replace(path)
    return best
