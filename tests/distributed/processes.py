"""Run a multi-process job from a test, bounded in time, leaving no process behind.

``subprocess.run(timeout=...)`` SIGKILLs only the launcher; its workers (gloo ranks waiting in a
collective, in sessions of their own under torch's elastic launcher) would live on and load the
machine for the rest of the suite. On timeout the launcher gets SIGTERM first, which it forwards
to every worker before it exits; whatever is left of its process group is then killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

GRACE_S = 20  # for the launcher to stop its workers after SIGTERM


def run_job(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                out, err = process.communicate(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                out, err = process.communicate()
            raise subprocess.TimeoutExpired(command, timeout, out, err) from None
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def train_on_processes(spec: Path, nproc: int, run_dir: Path, *overrides: str, timeout: float = 300) -> Path:
    """``moec train SPEC --nproc N`` as a user runs it (python -m from the repository root: this checkout's moec,
    also where the venv's moec script is another's); fails the test with the ranks' stderr. Returns the run dir."""
    from tests.conftest import REPO

    done = run_job([sys.executable, "-m", "moec.cli.main", "train", str(spec), "--nproc", str(nproc), "--run-dir", str(run_dir),
                    "--no-plots", *overrides], timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir
