"""Shared pieces for the hostile-input tests: a tiny finished run to damage, and the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from moec.checkpoint import dcp as ckpt
from moec.checkpoint.rundir import LOCK
from moec.cli.main import app
from tests.runtime.helpers import quick_text

runner = CliRunner()


def moec_cli(*args: str):
    """``moec ARGS`` in-process."""
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "500"})  # rich: no wrapping


def write_spec(directory: Path, steps: int = 4, every: int = 2, **kwargs) -> Path:
    path = Path(directory) / "quick.yaml"
    path.write_text(quick_text(steps=steps, every=every, **kwargs))
    return path


def reseal(checkpoint: Path) -> None:
    """Rewrite manifest.json to match the files as they are now: what a forger (or an old writer) would do."""
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    manifest["files"] = {
        p.relative_to(checkpoint).as_posix(): {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != ckpt.MANIFEST}
    try:
        meta = json.loads((checkpoint / ckpt.META).read_text())
    except ValueError:
        meta = None
    if isinstance(meta, dict) and isinstance(meta.get("step"), int):
        manifest["step"] = meta["step"]
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def tree_digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under a directory: proves nothing earlier was lost or changed (the run's
    lock file, which says who holds the directory now, is not the run's data)."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file() and p.name != LOCK}
