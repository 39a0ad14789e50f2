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


def _digest(source: str, support: str | None) -> str:
    return hashlib.sha256(((support or "") + source).encode("utf-8")).hexdigest()[:16]


def support_module(source: str, support: str) -> types.ModuleType | None:
    """The ``model_support`` module ``load_program(source, support=support)`` loaded in this process, or None."""
    return sys.modules.get(f"moec_support_{_digest(source, support)}")


def load_program(source: str, path: Path | None = None, filename: str = "model.py", support: str | None = None) -> types.ModuleType:
    """Execute generated source as a module written at ``path`` (default: the cache), registered with linecache.

    ``support``: the source of ``model_support.py``, written beside it and what its ``from model_support import``
    reads (the module is registered under that name only while ``source`` runs: each program has its own)."""
    digest = _digest(source, support)
    path = Path(path or cache_dir() / digest / filename).resolve()
    helper = None if support is None else _support(support, path.parent / "model_support.py", f"moec_support_{digest}")
    previous = sys.modules.get("model_support")
    if helper is not None:
        sys.modules["model_support"] = helper
    try:
        return _module(source, path, f"moec_generated_{digest}")
    finally:
        if helper is not None and previous is not None:
            sys.modules["model_support"] = previous
        elif helper is not None:
            del sys.modules["model_support"]


def _support(source: str, path: Path, name: str) -> types.ModuleType:
    """One module object per support source in a process: compiled code guards the classes it defines (MoeStats)
    through ``sys.modules[name]``, so a second module under the same name would fail those guards."""
    loaded = sys.modules.get(name)
    return loaded if loaded is not None and getattr(loaded, "__source__", None) == source else _module(source, path, name)


def _module(source: str, path: Path, name: str) -> types.ModuleType:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text(encoding="utf-8") != source:
        path.write_text(source, encoding="utf-8")
    filename = str(path)
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    module = types.ModuleType(name)
    module.__file__ = filename
    module.__source__ = source
    sys.modules[name] = module
    exec(compile(source, filename, "exec"), module.__dict__)
    return module
