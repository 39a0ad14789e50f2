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
