"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout: ``<run>/checkpoints/step_00000200/`` holds DCP's files (model weights, AdamW moments
and steps, RNG states: tensors only) and ``meta.json`` (step, data position, spec sha256,
the resolved spec, learning rates, validation loss). A checkpoint is written into a hidden
``.tmp-*`` directory and renamed into place after ``meta.json`` is written, so a crash
mid-save never leaves a directory that looks complete; leftovers are removed on resume.

Nothing is unpickled from a checkpoint: DCP loads tensors, and everything else is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

META = "meta.json"


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    meta: dict


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _tensor_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Model, AdamW moments (flat: ``<param>.<slot>``) and RNG; DTensors under FSDP2, so DCP can reshard them."""
    if hasattr(model, "reshard"):  # FSDP2 leaves the root unsharded after a step: register the sharded params again
        model.reshard()
    state = get_optimizer_state_dict(model, optimizer)["state"]
    optim = {f"{name}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
             for name, slots in state.items() for key, value in slots.items()}
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return {"model": get_model_state_dict(model), "optim": optim, "rng": rng}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, meta: dict, dist_ctx=None) -> Path:
    """Every rank calls this (DCP writes each rank's shards); rank 0 writes meta.json and commits."""
    main = dist_ctx is None or dist_ctx.is_main
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    # One directory for all ranks: named by the step alone when several processes write it.
    tmp = root / (f".tmp-step_{step:08d}-{os.getpid()}" if dist_ctx is None or not dist_ctx.distributed else f".tmp-step_{step:08d}")
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier(dist_ctx)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_tensor_state(model, optimizer), checkpoint_id=str(tmp))
    if main:
        (tmp / META).write_text(json.dumps(meta | {"step": step}, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        _commit(tmp, final)
        _fsync_dir(root)
    _barrier(dist_ctx)
    return final


def _barrier(dist_ctx) -> None:
    if dist_ctx is not None:
        dist_ctx.barrier()


def _commit(tmp: Path, final: Path) -> None:
    """The commit point: before it the checkpoint does not exist, after it it is complete."""
    os.rename(tmp, final)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: Path) -> CheckpointInfo | None:
    """The checkpoint at ``path``, or None when it is not complete (no meta.json)."""
    meta_file = Path(path) / META
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    return CheckpointInfo(Path(path), meta["step"], meta)


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first (directories without meta.json are ignored)."""
    root = checkpoint_root(run_dir)
    found = [read_checkpoint(path) for path in (sorted(root.glob("step_*")) if root.exists() else [])]
    return [info for info in found if info is not None]


def remove_partial(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    partial = sorted(root.glob(".tmp-*")) if root.exists() else []
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def load_checkpoint(path: Path, model, optimizer) -> None:
    """Restore model, optimizer moments and RNG in place (the meta is ``read_checkpoint``'s)."""
    path = Path(path)
    state = _tensor_state(model, optimizer)
    if not state["optim"]:  # a fresh optimizer has no moments yet: make the slots to load into
        _init_optimizer_state(optimizer)
        state = _tensor_state(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    _restore_optimizer(model, optimizer, state["optim"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])


def load_model_state(path: Path, model) -> None:
    """Only the model's weights from a checkpoint (no optimizer, no RNG): for export and --init-from."""
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }


def _restore_optimizer(model, optimizer, flat: dict) -> None:
    nested: dict[str, dict] = {}
    for key, value in flat.items():
        name, slot = key.rsplit(".", 1)
        nested.setdefault(name, {})[slot] = value
    groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
    set_optimizer_state_dict(model, optimizer, {"state": nested, "param_groups": groups})


def prune(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    """Keep the newest ``keep_last`` checkpoints and the best one."""
    complete = list_checkpoints(run_dir)
    for info in complete[:-keep_last]:
        if info.step != best_step:
            shutil.rmtree(info.path, ignore_errors=True)


def spec_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Key paths whose values differ between two resolved specs, as ``path: old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(f"{path}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
            else:
                out.extend(spec_differences(old[key], new[key], path))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in spec_differences(a, b, f"{prefix}[{i}]")]
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]
