"""The run directory's rules: one run per directory, one writer at a time, nothing lost silently.

- A fresh run refuses a directory that already holds a run (rows in ``metrics.jsonl`` or
  checkpoints): the user says ``--resume`` (continue it), ``--overwrite`` (delete the old run's
  files first) or picks another directory.
- ``<run>/run.lock`` is held with ``flock`` for the whole run and names its owner (pid, host,
  start time, command). A second ``moec train`` into the directory finds the lock taken and
  refuses, naming the owner. The kernel drops the lock when its process dies however it dies;
  the file's text then names a pid that is gone: a stale lock, taken over with a note. A lock
  file written on another host (a shared file system where flock may not reach) is not taken
  over silently: the user is told to delete it if that run is over.
- The resolved spec (with the command-line overrides in its header) is written to
  ``<run>/spec.yaml``: the run is reproducible from that file alone.

Under several processes only rank 0 looks at the directory and takes the lock; its decision
(go on, or the error message) is broadcast, so every rank stops or none does.
"""

from __future__ import annotations

import atexit
import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path

LOCK = "run.lock"
RUN_SPEC = "spec.yaml"
METRICS = "metrics.jsonl"
# What a run writes and --overwrite deletes; nothing else in the directory is touched.
RUN_OUTPUTS = (METRICS, "checkpoints", "loss.png", "experts.png", "throughput.png", "tensorboard", RUN_SPEC)


class RunDirError(ValueError):
    """The run directory cannot be used as asked: one line for the user."""


class RunLock:
    """``flock`` on ``<run>/run.lock`` for as long as the run goes; the file names the owner."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None
        self.note: str | None = None  # set when a stale lock was taken over

    def acquire(self) -> "RunLock":
        _HELD.pop(self.path.resolve(), _NOT_HELD).release()  # this process's earlier run in the same directory
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunDirError(f"{self.path.parent} is in use by another moec train ({_describe(owner)}); wait for it to "
                              "finish, stop it, or use another --run-dir") from None
        try:
            self.note = _stale_note(self.path, _read_owner(fd))
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_me()) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        _HELD[self.path.resolve()] = self
        atexit.register(self.release)
        return self

    def release(self) -> None:
        """Empty the file (a clean end leaves no owner behind) and drop the lock; safe to call twice."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:  # a read-only or full disk at the end: the flock still goes with the close
            pass
        os.close(fd)
        if _HELD.get(self.path.resolve()) is self:
            del _HELD[self.path.resolve()]


class _NotHeld:
    def release(self) -> None:
        pass


_NOT_HELD = _NotHeld()
_HELD: dict[Path, RunLock] = {}


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["moec", *sys.argv[1:]]) if sys.argv else "moec"}


def _read_owner(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
        owner = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _describe(owner: dict | None) -> str:
    if owner is None:
        return "its owner is not recorded"
    return f"pid {owner['pid']} on {owner.get('host', '?')}, started {owner.get('started', '?')}: {owner.get('command', '?')}"


def _stale_note(path: Path, owner: dict | None) -> str | None:
    """None when the lock was free; a note when it named an owner that is gone; an error when we cannot tell."""
    if owner is None or (owner["pid"] == os.getpid() and owner.get("host") == socket.gethostname()):
        return None  # free, or this process's own earlier run
    if owner.get("host") != socket.gethostname():
        raise RunDirError(f"{path} names a run on another host ({_describe(owner)}); if that run is over, delete {path}")
    if _alive(owner["pid"]):
        # flock was free, so that pid is a different process now (the pid was reused): the lock is stale
        return f"took over the lock of pid {owner['pid']} (its run is gone; the pid now belongs to another process)"
    return f"took over a stale lock: pid {owner['pid']} (started {owner.get('started', '?')}) is no longer running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def existing_run(run_dir: Path) -> str | None:
    """What a run left in ``run_dir`` (``metrics.jsonl with 306 rows, checkpoints up to step 300``), or None."""
    from moec.checkpoint.dcp import STEP_DIR, checkpoint_root

    found = []
    metrics = Path(run_dir) / METRICS
    if metrics.is_file() and metrics.stat().st_size:
        with open(metrics, "rb") as handle:
            rows = sum(1 for line in handle if line.strip())
        if rows:
            found.append(f"{METRICS} with {rows} row(s)")
    root = checkpoint_root(Path(run_dir))
    steps = sorted(int(m.group(1)) for m in map(STEP_DIR.match, os.listdir(root)) if m) if root.is_dir() else []
    if steps:
        found.append(f"checkpoints up to step {steps[-1]}")
    return ", ".join(found) or None


def clear_run(run_dir: Path) -> list[Path]:
    """Delete what an earlier run wrote (``RUN_OUTPUTS``), nothing else."""
    removed = []
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


def claim(run_dir: Path, resume: bool, overwrite: bool) -> RunLock:
    """Take the lock, then apply the fresh-run rule; the lock is dropped again if the run may not start."""
    lock = RunLock(run_dir).acquire()
    try:
        if not resume:
            found = existing_run(run_dir)
            if found and not overwrite:
                raise RunDirError(f"{run_dir} already holds a run ({found}); continue it with --resume, start over with "
                                  "--overwrite (deletes it), or pick another --run-dir")
            if overwrite:
                clear_run(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def claim_on_rank0(run_dir: Path, resume: bool, overwrite: bool, dist_ctx) -> RunLock | None:
    """:func:`claim` on rank 0; every rank raises the same RunDirError if it failed (no rank is left waiting)."""
    lock, error = None, None
    if dist_ctx.is_main:
        try:
            lock = claim(run_dir, resume, overwrite)
        except (RunDirError, OSError) as err:
            error = str(err) if isinstance(err, RunDirError) else f"cannot write {err.filename or run_dir}: {err.strerror or err}"
    if dist_ctx.distributed:
        import torch.distributed as dist

        decision = [error]
        dist.broadcast_object_list(decision, src=0)
        error = decision[0]
    if error is not None:
        raise RunDirError(error)
    return lock


def write_run_spec(run_dir: Path, spec, overrides: list[str]) -> Path:
    """``<run>/spec.yaml``: the resolved spec the run trains, its source file and overrides in the header."""
    from moec.observe.metrics import replace_atomically
    from moec.schema import resolved_yaml

    source = spec.source
    header = [f"# resolved by moec from {getattr(source, 'file', None) or '<no file>'}"]
    header += [f"# override: {json.dumps(text)}" for text in overrides]
    path = Path(run_dir) / RUN_SPEC
    replace_atomically(path, "\n".join(header) + "\n" + resolved_yaml(spec))
    return path


def checked_run_dir(value) -> Path:
    """The run directory, refusing ones where a run would write over unrelated files."""
    text = str(value).strip()
    if not text:
        raise RunDirError("the run directory is empty: set train.checkpoint.dir or --run-dir to a directory of its own")
    path = Path(text).expanduser()
    resolved = path.resolve()
    home = Path.home().resolve()
    if resolved == Path(resolved.anchor) or resolved == home or resolved in Path.cwd().resolve().parents or resolved == Path.cwd().resolve():
        raise RunDirError(f"refusing run directory {text!r} (it is {resolved}): a run writes metrics.jsonl, plots and "
                            "checkpoints there; use a directory of its own such as runs/<name>")
    return path
