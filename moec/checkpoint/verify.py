"""Finding and verifying checkpoints, and reading DCP's metadata without running code.

A checkpoint is trusted only after :func:`verify_checkpoint`: every file against
``manifest.json`` (size and sha256), the step against the directory name, meta.json's shape,
and DCP's ``.metadata`` through a restricted unpickler. Every refusal is a
:class:`CheckpointError` whose message is one line naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
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
        raise CheckpointError(f"{path}: not a DCP metadata file ({type(err).__name__}: {first_line(err)})") from None
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


def file_table(directory: Path) -> dict:
    """The manifest's ``files``: size and sha256 of every file under ``directory`` but the manifest."""
    return {path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name != MANIFEST}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def first_line(err: BaseException) -> str:
    """An error's message as one line (its type's name when it has none), for CheckpointError's text."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
