"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically and verified on load.

Layout: ``<run>/checkpoints/step_00000200/`` holds DCP's files (model weights, AdamW moments
and steps, RNG states: tensors only), ``meta.json`` (step, data position, spec sha256, the
resolved spec, learning rates, validation loss) and, written last, ``manifest.json``: the
size and sha256 of every other file, the step, the spec sha256 and the data fingerprint.
A checkpoint is written into a hidden ``.tmp-*`` directory and renamed into place after the
manifest is written, so a crash mid-save never leaves a directory that looks complete;
leftovers are removed on resume.

Loading verifies first (:func:`verify_checkpoint`): every file against the manifest, the
step against the directory name, the shape of meta.json. Any mismatch is a
:class:`CheckpointError` whose message is one line naming the file. DCP's ``.metadata`` is a
pickle; it is read by :class:`SafeReader`, whose unpickler admits only the classes DCP's
metadata is made of (a pickle that names anything else, ``os.system`` say, is refused
before anything is called). Tensors are read by DCP with ``torch.load(weights_only=True)``;
everything else is JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from moec.checkpoint.expert_order import from_id_order, to_id_order
from moec.checkpoint.verify import (  # noqa: F401 - the checkpoint API is used through this module
    MANIFEST,
    MANIFEST_FORMAT,
    META,
    NO_SPACE,
    STEP_DIR,
    CheckpointError,
    CheckpointInfo,
    SafeReader,
    checkpoint_dirs,
    checkpoint_root,
    file_table,
    first_line,
    list_checkpoints,
    read_checkpoint,
    read_dcp_metadata,
    verify_checkpoint,
)

# --- saving --------------------------------------------------------------------------------

def tensor_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Model, AdamW moments (flat: ``<param>.<slot>``) and RNG; DTensors under FSDP2, so DCP can reshard them."""
    if hasattr(model, "reshard"):  # FSDP2 leaves the root unsharded after a step: register the sharded params again
        model.reshard()
    state = get_optimizer_state_dict(model, optimizer)["state"]
    optim = {f"{name}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
             for name, slots in state.items() for key, value in slots.items()}
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    state = {"model": get_model_state_dict(model), "optim": optim, "rng": rng}
    to_id_order(state, model)  # experts placed by consistent_hash are saved in id order
    return state


def save_checkpoint(run_dir: Path, step: int, model, optimizer, meta: dict, data_fingerprint: str = "", dist_ctx=None) -> Path:
    """Write ``step_NNNNNNNN`` atomically; an OSError (a full disk) leaves no partial directory behind.

    Every rank calls this (DCP writes each rank's shards into one directory); rank 0 writes
    meta.json and the manifest and commits. ``moec.checkpoint.async_write`` does the same with the
    tensors written in the background.
    """
    main = dist_ctx is None or dist_ctx.is_main
    tmp, final = begin_checkpoint(run_dir, step, dist_ctx)
    with removed_on_error(tmp, final):
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(tensor_state(model, optimizer), checkpoint_id=str(tmp))
        _barrier(dist_ctx)  # every rank's shards are on disk before rank 0 hashes them
        if main:
            seal_checkpoint(tmp, step, meta, data_fingerprint)
    if main:
        commit_checkpoint(tmp, final)
    _barrier(dist_ctx)
    return final


def begin_checkpoint(run_dir: Path, step: int, dist_ctx) -> tuple[Path, Path]:
    """The hidden directory the ranks write ``step`` into (emptied by rank 0) and the name it gets when complete."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    # One directory for all ranks: named by the step alone when several processes write it.
    distributed = dist_ctx is not None and dist_ctx.distributed
    tmp = root / (f".tmp-step_{step:08d}" if distributed else f".tmp-step_{step:08d}-{os.getpid()}")
    if dist_ctx is None or dist_ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier(dist_ctx)
    return tmp, final


def seal_checkpoint(tmp: Path, step: int, meta: dict, data_fingerprint: str) -> None:
    """Rank 0, once every rank's tensors are on disk: meta.json, then the manifest that vouches for the rest."""
    meta = meta | {"step": step}
    _write_synced(tmp / META, json.dumps(meta, indent=1))
    manifest = {"format": MANIFEST_FORMAT, "step": step, "spec_sha256": meta.get("spec_sha256"),
                "data_fingerprint": data_fingerprint, "files": file_table(tmp)}
    _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1))  # last: it vouches for the rest
    _fsync_dir(tmp)


def commit_checkpoint(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    _commit(tmp, final)
    _fsync_dir(final.parent)


@contextlib.contextmanager
def removed_on_error(tmp: Path, final: Path):
    """A failed write removes ``tmp``; a full disk becomes an OSError naming ``final``; interrupts stay themselves."""
    try:
        yield
    except BaseException as err:  # DCP wraps what went wrong in its CheckpointException (a BaseException)
        shutil.rmtree(tmp, ignore_errors=True)
        cause = root_oserror(err)
        if cause is not None:  # a full disk: the caller names the checkpoint and the last complete one
            raise OSError(cause.errno, cause.strerror, str(final)) from None
        inner = _innermost(err)
        if inner is not err:  # e.g. a second SIGINT's abort raised inside torch.save: let it be itself
            raise inner from None
        raise


def _barrier(dist_ctx) -> None:
    if dist_ctx is not None:
        dist_ctx.barrier()


def root_oserror(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: itself, its cause, or one inside DCP's CheckpointException."""
    seen = set()
    stack = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        for wrapped in getattr(current, "failures", {}).values() if isinstance(getattr(current, "failures", None), dict) else ():
            stack.append(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
        stack += [current.__cause__, current.__context__]
    return None


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _commit(tmp: Path, final: Path) -> None:
    """The commit point: before it the checkpoint does not exist, after it it is complete."""
    os.rename(tmp, final)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    partial = sorted(root.glob(".tmp-*")) if root.exists() else []
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


# --- loading -------------------------------------------------------------------------------

def load_checkpoint(path: Path, model, optimizer) -> None:
    """Restore model, optimizer moments and RNG in place; call :func:`verify_checkpoint` first."""
    path = Path(path)
    state = tensor_state(model, optimizer)
    if not state["optim"]:  # a fresh optimizer has no moments yet: make the slots to load into
        _init_optimizer_state(optimizer)
        state = tensor_state(model, optimizer)
    _dcp_load(state, path)
    from_id_order(state, model)
    set_model_state_dict(model, state["model"])
    _restore_optimizer(model, optimizer, state["optim"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])


def load_model_state(path: Path, model) -> None:
    """Only the model's weights from a checkpoint (no optimizer, no RNG): for export and --init-from."""
    state = {"model": model.state_dict()}
    _dcp_load(state, Path(path))
    model.load_state_dict(state["model"])


# State-dict keys of checkpoints written before attention and MLP projections became nn.Linear modules.
_OLD_NAMES = re.compile(r"^model\.blocks\.\d+\.(attention\.[wb][qkvo]|mlp\.[wb]_(up|gate|down))$")
# ... and before gated experts held gate and up in one weight (a model's own DCP state is loaded in place, weights and
# AdamW moments on any mesh: refused with the way across rather than reshaped here).
_SPLIT_EXPERTS = re.compile(r"^model\.blocks\.\d+\..*\bexperts\.[wb]_gate$")


def _refuse_old_names(path: Path) -> None:
    """One line for a checkpoint whose projections carry the names from before ``attention.wq.weight``."""
    try:
        keys = SafeReader(str(path)).read_metadata().state_dict_metadata
    except Exception:  # unreadable metadata: DCP's load says what is wrong
        return
    old = sorted(key for key in keys if _OLD_NAMES.match(key))
    if old:
        raise CheckpointError(f"{path}: written by an older moec, whose state-dict names ({old[0][len('model.'):]}) predate "
                              "the nn.Linear ones (attention.wq.weight, mlp.w_up.weight); export it to Hugging Face with "
                              "that moec and import it here (moec export hf / moec import hf), or retrain")
    split = sorted(key for key in keys if _SPLIT_EXPERTS.match(key))
    if split:
        raise CheckpointError(f"{path}: written by an older moec, whose gated experts keep gate and up apart "
                              f"({split[0][len('model.'):]}); this one holds them in one experts.w_gate_up [E, 2, H, D]: "
                              "export it to Hugging Face with that moec and import it here (moec export hf / moec import hf), "
                              "or retrain")


def _dcp_load(state: dict, path: Path) -> None:
    """DCP's load through :class:`SafeReader`; what goes wrong is one ``CheckpointError`` line (interrupts pass through)."""
    _refuse_old_names(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path), storage_reader=SafeReader(str(path)))
    except CheckpointError:
        raise
    except BaseException as err:  # DCP's CheckpointException is a BaseException
        inner = _innermost(err)
        if isinstance(inner, CheckpointError) or not isinstance(inner, Exception):  # ours, or an interrupt
            raise inner from None
        raise CheckpointError(f"{path}: DCP cannot load it into this model ({type(inner).__name__}: {first_line(inner)})") from None


def _innermost(err: BaseException) -> BaseException:
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        wrapped = next(iter(failures.values()))
        return _innermost(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
    return err


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


# --- pruning -------------------------------------------------------------------------------

def prune(run_dir: Path, keep_last: int, best_steps=()) -> list[Path]:
    """Keep the newest ``keep_last`` checkpoint directories and those of ``best_steps``; by name, nothing is read."""
    removed = []
    for path in checkpoint_dirs(run_dir)[:-keep_last]:
        if int(STEP_DIR.match(path.name).group(1)) not in best_steps:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def best_steps(val_at: dict[int, float], saved: set[int], count: int) -> set[int]:
    """``train.checkpoint.keep_best``: the ``count`` checkpointed steps with the lowest validation loss (ties: the earlier)."""
    ranked = sorted((val, step) for step, val in val_at.items() if step in saved)
    return {step for _, step in ranked[:count]}


def checkpoint_steps(run_dir: Path) -> set[int]:
    return {int(STEP_DIR.match(path.name).group(1)) for path in checkpoint_dirs(run_dir)}


def prune_before_save(run_dir: Path, keep_last: int, best_steps=()) -> list[Path]:
    """Make room for the next save: keep ``keep_last - 1`` (at least the newest one) and the best.

    After the save, :func:`prune` brings it back to ``keep_last``. A save then needs room for
    one checkpoint, not ``keep_last + 1``; the newest complete checkpoint is never removed
    before its successor is committed.
    """
    return prune(run_dir, max(keep_last - 1, 1), best_steps)


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
