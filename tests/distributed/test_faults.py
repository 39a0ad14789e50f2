"""Faults in a 2-process expert-parallel run: signals stop every rank after one agreed step with a
checkpoint; a rank killed or hung ends the whole job in bounded time, naming a rank."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moec.checkpoint import dcp as ckpt
from tests.conftest import REPO
from tests.distributed.test_parallel_training import MESHES, spec_text

MOEC = Path(sys.executable).parent / "moec"


def start(tmp_path: Path, timeout_s: int = 120, every: int = 1000) -> subprocess.Popen:
    text = spec_text(MESHES["ep"]).replace("steps: 5", "steps: 100000").replace("every: 3", f"every: {every}")
    spec = tmp_path / "ep.yaml"
    spec.write_text(text.replace("train:\n", f"train:\n  collective_timeout_s: {timeout_s}\n"))
    return subprocess.Popen([str(MOEC), "train", str(spec), "--nproc", "2", "--run-dir", str(tmp_path / "run"), "--no-plots"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pids(launcher: subprocess.Popen, deadline: float) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes, read from /proc (RANK in their environment)."""
    while time.monotonic() < deadline:
        found = {}
        for entry in Path("/proc").iterdir():
            try:
                status = (entry / "status").read_text()
                parent = int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])
                if parent == launcher.pid:
                    env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
                    found[int(env["RANK"])] = int(entry.name)
            except (OSError, ValueError, StopIteration, KeyError):
                continue
        if len(found) == 2:
            return found
        time.sleep(0.2)
    raise AssertionError("the workers never started")


def wait_for_steps(run_dir: Path, steps: int, deadline: float) -> None:
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count('"kind": "train"') >= steps:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {steps} training steps before the deadline")


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, err, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("target, sig, code", [("launcher", signal.SIGINT, 130), ("rank 1", signal.SIGTERM, 143)])
def test_a_signal_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path, target, sig, code):
    proc = start(tmp_path)
    deadline = time.monotonic() + 240
    pids = rank_pids(proc, deadline)
    wait_for_steps(tmp_path / "run", 2, deadline)
    os.kill(proc.pid if target == "launcher" else pids[1], sig)
    returncode, err, seconds = finish(proc, 120)
    assert returncode == code, err[-3000:]
    stopped = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1 and stopped[0].startswith(f"stopped by {sig.name} at step "), err[-3000:]
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert [info.step for info in ckpt.list_checkpoints(tmp_path / "run")] == [step]  # complete, verified, both ranks'
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_or_hung_rank_ends_the_job_naming_a_rank(tmp_path, fault):
    proc = start(tmp_path, timeout_s=10)
    deadline = time.monotonic() + 240
    pids = rank_pids(proc, deadline)
    wait_for_steps(tmp_path / "run", 2, deadline)
    os.kill(pids[1], signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    returncode, err, seconds = finish(proc, 90)
    assert returncode == 1 and seconds < 90, err[-3000:]
    last = err.strip().splitlines()[-1]
    if fault == "killed":
        assert last.startswith("error: rank 1 failed first (killed by SIGKILL); the launcher stopped rank(s) 0"), err[-3000:]
    else:  # rank 0 waits train.collective_timeout_s in the exchange with rank 1, then fails and the launcher ends rank 1
        assert "error: a collective did not finish within train.collective_timeout_s (10 s)" in err, err[-3000:]
        assert last.startswith("error: rank 0 failed first (exit code 1); the launcher stopped rank(s) 1"), err[-3000:]


def test_both_of_gloos_timeout_messages_read_as_a_collective_timeout():
    """Which collective a hung peer leaves waiting decides gloo's words: a receive's, or an all-to-all's pair closure
    (the deduplicated dispatch's integer exchange); both must give the one-line collective_timeout_s error."""
    from moec.distributed.processes import timed_out

    assert timed_out(RuntimeError("[gloo/transport/tcp/pair.cc:534] Timed out waiting 10000ms for recv operation to complete"))
    assert timed_out(RuntimeError("Application timeout caused pair closure"))
    assert not timed_out(RuntimeError("Tensors must have the same number of dimensions"))
