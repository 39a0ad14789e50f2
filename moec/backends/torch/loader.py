"""Run generated source as a module whose tracebacks and breakpoints land in its file."""

from __future__ import annotations

import hashlib
import linecache
import os
import sys
import types
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("MOEC_CACHE_DIR") or Path.home() / ".cache" / "moec")


def load_program(source: str, path: Path | None = None, filename: str = "model.py") -> types.ModuleType:
    """Execute generated source as a module written at ``path`` (default: the cache), registered with linecache."""
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]
    path = Path(path or cache_dir() / digest / filename).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text(encoding="utf-8") != source:
        path.write_text(source, encoding="utf-8")
    filename = str(path)
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    name = f"moec_generated_{digest}"
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module
    exec(compile(source, filename, "exec"), module.__dict__)
    return module
