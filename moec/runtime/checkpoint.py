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

import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import FileSystemReader

META = "meta.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
MAX_JSON_BYTES = 64 << 20  # meta.json holds a resolved spec: a few KiB
MAX_METADATA_BYTES = 256 << 20  # DCP's .metadata: ~200 bytes per tensor
STEP_DIR = re.compile(r"^step_(\d{8,})$")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line that names the file."""


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    meta: dict
    manifest: dict = field(default_factory=dict)


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


# --- reading DCP metadata without running code -------------------------------------------

_METADATA_CLASSES = {
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name in torch's own table
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
        "TensorStorageMetadata", "_MEM_FORMAT_ENCODING")),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Only DCP's metadata dataclasses, torch dtypes and paths: never a function that acts."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id")


def read_dcp_metadata(path: Path) -> dcp_metadata.Metadata:
    """DCP's ``.metadata`` through the restricted unpickler; CheckpointError when it is not one."""
    data = _read_limited(path, MAX_METADATA_BYTES)
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # noqa: BLE001 - any failure of a hostile or torn pickle is the same refusal
        raise CheckpointError(f"{path}: not a DCP metadata file ({type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{path}: not a DCP metadata file (it holds a {type(metadata).__name__})")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's filesystem reader with :func:`read_dcp_metadata` instead of ``pickle.load``."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# --- saving --------------------------------------------------------------------------------

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


def save_checkpoint(run_dir: Path, step: int, model, optimizer, meta: dict, data_fingerprint: str = "", dist_ctx=None) -> Path:
    """Write ``step_NNNNNNNN`` atomically; an OSError (a full disk) leaves no partial directory behind.

    Every rank calls this (DCP writes each rank's shards into one directory); rank 0 writes
    meta.json and the manifest and commits.
    """
    main = dist_ctx is None or dist_ctx.is_main
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    # One directory for all ranks: named by the step alone when several processes write it.
    distributed = dist_ctx is not None and dist_ctx.distributed
    tmp = root / (f".tmp-step_{step:08d}" if distributed else f".tmp-step_{step:08d}-{os.getpid()}")
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier(dist_ctx)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(_tensor_state(model, optimizer), checkpoint_id=str(tmp))
        _barrier(dist_ctx)  # every rank's shards are on disk before rank 0 hashes them
        if main:
            meta = meta | {"step": step}
            _write_synced(tmp / META, json.dumps(meta, indent=1))
            manifest = {"format": MANIFEST_FORMAT, "step": step, "spec_sha256": meta.get("spec_sha256"),
                        "data_fingerprint": data_fingerprint, "files": _file_table(tmp)}
            _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1))  # last: it vouches for the rest
            _fsync_dir(tmp)
    except BaseException as err:  # DCP wraps what went wrong in its CheckpointException (a BaseException)
        shutil.rmtree(tmp, ignore_errors=True)
        cause = root_oserror(err)
        if cause is not None:  # a full disk: the caller names the checkpoint and the last complete one
            raise OSError(cause.errno, cause.strerror, str(final)) from None
        inner = _innermost(err)
        if inner is not err:  # e.g. a second SIGINT's abort raised inside torch.save: let it be itself
            raise inner from None
        raise
    if main:
        if final.exists():
            shutil.rmtree(final)
        _commit(tmp, final)
        _fsync_dir(root)
    _barrier(dist_ctx)
    return final


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


def _file_table(directory: Path) -> dict:
    return {path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name != MANIFEST}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


# --- finding and verifying -----------------------------------------------------------------

def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """``step_*`` directories under the run, oldest first by the step in their name (nothing is read)."""
    root = checkpoint_root(run_dir)
    try:
        if not root.is_dir():
            return []
        found = [(int(m.group(1)), path) for path in root.iterdir() if (m := STEP_DIR.match(path.name)) and path.is_dir()]
    except OSError as err:  # an unreadable run directory
        raise CheckpointError(f"{root}: cannot read ({err.strerror})") from None
    return [path for _, path in sorted(found)]


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Checkpoints whose manifest and meta.json read cleanly, oldest first (files are not hashed: see verify)."""
    found = []
    try:
        paths = checkpoint_dirs(run_dir)
    except CheckpointError:
        return []
    for path in paths:
        try:
            found.append(_read_light(path))
        except CheckpointError:
            continue
    return found


def _read_light(path: Path) -> CheckpointInfo:
    manifest = _read_json_object(path / MANIFEST)
    meta = _read_json_object(path / META)
    step = _checked_step(meta, path / META)
    return CheckpointInfo(path, step, meta, manifest)


def read_checkpoint(path: Path) -> CheckpointInfo:
    """The verified checkpoint at ``path`` (see :func:`verify_checkpoint`)."""
    return verify_checkpoint(path)


def verify_checkpoint(path: Path) -> CheckpointInfo:
    """Check every file against manifest.json and meta.json against both; CheckpointError names the culprit."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory" + ("" if path.exists() else " (it does not exist)"))
    manifest = _read_json_object(path / MANIFEST)
    _verify_files(path, manifest)
    info = _read_light(path)
    _verify_meta(info, manifest)
    read_dcp_metadata(path / ".metadata")  # refuses a hostile pickle before DCP is asked to load anything
    return info


def _verify_files(path: Path, manifest: dict) -> None:
    """The files on disk are exactly the manifest's, with its sizes and sha256s."""
    files = manifest.get("files")
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
            for entry in files.values()):
        raise CheckpointError(f"{path / MANIFEST}: not a moec checkpoint manifest (format {MANIFEST_FORMAT})")
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != MANIFEST}
    for name in sorted(set(files) - on_disk):
        raise CheckpointError(f"{path / name}: missing (listed in {MANIFEST})")
    for name in sorted(on_disk - set(files)):
        raise CheckpointError(f"{path / name}: not listed in {MANIFEST} (copied in from elsewhere?)")
    for name in sorted(files):
        size = (path / name).stat().st_size
        if size != files[name]["size"]:
            raise CheckpointError(f"{path / name}: {size} bytes, but {MANIFEST} says {files[name]['size']} (truncated or replaced)")
        if _sha256(path / name) != files[name]["sha256"]:
            raise CheckpointError(f"{path / name}: sha256 does not match {MANIFEST} (damaged or replaced)")


def _verify_meta(info: CheckpointInfo, manifest: dict) -> None:
    """meta.json agrees with the manifest and the directory name, and has the fields a resume reads."""
    meta_file = info.path / META
    if manifest.get("step") != info.step:
        raise CheckpointError(f"{meta_file}: step {info.step}, but {MANIFEST} says {manifest.get('step')!r}")
    named = STEP_DIR.match(info.path.name)
    if named and int(named.group(1)) != info.step:
        raise CheckpointError(f"{meta_file}: step {info.step} does not match the directory name {info.path.name}")
    if info.meta.get("spec_sha256") != manifest.get("spec_sha256"):
        raise CheckpointError(f"{meta_file}: spec_sha256 does not match {MANIFEST}")
    spec = info.meta.get("spec")
    if not isinstance(spec, dict) or not all(isinstance(spec.get(key), dict) for key in ("model", "train", "schedule", "mesh", "sharding")):
        raise CheckpointError(f"{meta_file}: 'spec' is missing or is not a resolved spec")
    if not (_is_number_or_null(info.meta.get("best_val"), float) and _is_number_or_null(info.meta.get("best_step"), int)):
        raise CheckpointError(f"{meta_file}: best_val / best_step must be numbers or null")


def _is_number_or_null(value, kind) -> bool:
    allowed = (int, float) if kind is float else (int,)
    return value is None or (isinstance(value, allowed) and not isinstance(value, bool))


def _checked_step(meta: dict, file: Path) -> int:
    step = meta.get("step")
    if "step" not in meta:
        raise CheckpointError(f"{file}: no 'step'")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise CheckpointError(f"{file}: 'step' must be a positive integer, got {step!r}")
    return step


def _read_json_object(file: Path) -> dict:
    try:
        text = _read_limited(file, MAX_JSON_BYTES).decode("utf-8")
        value = json.loads(text)
    except UnicodeDecodeError:
        raise CheckpointError(f"{file}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(value).__name__}")
    return value


def _read_limited(file: Path, limit: int) -> bytes:
    try:
        with open(file, "rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except OSError as err:
        raise CheckpointError(f"{file}: cannot read ({err.strerror})") from None
    if len(data) > limit:
        raise CheckpointError(f"{file}: larger than {limit} bytes")
    return data


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
    state = _tensor_state(model, optimizer)
    if not state["optim"]:  # a fresh optimizer has no moments yet: make the slots to load into
        _init_optimizer_state(optimizer)
        state = _tensor_state(model, optimizer)
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
        raise CheckpointError(f"{path}: DCP cannot load it into this model ({type(inner).__name__}: {_first_line(inner)})") from None
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
        dcp.load(state, checkpoint_id=str(path), storage_reader=SafeReader(str(path)))
    model.load_state_dict(state["model"])


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

def prune(run_dir: Path, keep_last: int, best_step: int | None) -> list[Path]:
    """Keep the newest ``keep_last`` checkpoint directories and the best one; by name, nothing is read."""
    removed = []
    for path in checkpoint_dirs(run_dir)[:-keep_last]:
        if int(STEP_DIR.match(path.name).group(1)) != best_step:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def prune_before_save(run_dir: Path, keep_last: int, best_step: int | None) -> list[Path]:
    """Make room for the next save: keep ``keep_last - 1`` (at least the newest one) and the best.

    After the save, :func:`prune` brings it back to ``keep_last``. A save then needs room for
    one checkpoint, not ``keep_last + 1``; the newest complete checkpoint is never removed
    before its successor is committed.
    """
    return prune(run_dir, max(keep_last - 1, 1), best_step)


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
