"""The bounded job runner of the distributed tests leaves no process behind on timeout."""

import subprocess
import sys
import time

import pytest

from tests.distributed import processes


def test_a_job_past_its_time_is_killed_with_its_children(monkeypatch, tmp_path):
    monkeypatch.setattr(processes, "GRACE_S", 1)
    pid_file = tmp_path / "child.pid"
    # a launcher that ignores SIGTERM and a worker in its process group, both sleeping
    code = ("import os, signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); "
            "time.sleep(60)")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        processes.run_job([sys.executable, "-c", code], timeout=3)
    assert time.monotonic() - started < 20
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child)


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_job_in_time_returns_its_output():
    done = processes.run_job([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
