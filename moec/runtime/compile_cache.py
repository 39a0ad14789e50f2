"""torch.compile's caches kept beside the generated program, so a second start of the same
program skips Inductor's code generation even where its /tmp caches are gone (a new machine,
a CI runner, a cleaned /tmp).

After the first compiled step the trainer saves ``torch.compiler.save_cache_artifacts()``
(Inductor's FX-graph cache, AOTAutograd's cache, autotuning results: the "mega-cache") to
``$MOEC_CACHE_DIR/<program sha256>/torch-<version>.compile-cache``; the next start of the
same program (same source, same torch) loads it before compiling. Only Dynamo's trace of
the Python code runs again. Any failure is a cache miss: compiling from scratch is correct.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from moec.backends.torch.loader import cache_dir


def artifact_path(source: str) -> Path:
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()
    return cache_dir() / digest[:16] / f"torch-{torch.__version__}.compile-cache"


def load(source: str) -> bool:
    """Load the saved artifacts of this program into torch's caches; whether there were any."""
    path = artifact_path(source)
    try:
        blob = path.read_bytes()
    except OSError:
        return False
    try:
        return torch.compiler.load_cache_artifacts(blob) is not None
    except Exception:  # written by another build of torch, or damaged: compile from scratch
        return False


def save(source: str) -> Path | None:
    """Write what torch compiled so far in this process; None when there is nothing to save."""
    try:
        saved = torch.compiler.save_cache_artifacts()
    except Exception:
        return None
    if saved is None:
        return None
    path = artifact_path(source)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(saved[0])
        tmp.replace(path)
    except OSError:  # a read-only cache directory costs only the next start's compile time
        return None
    return path
