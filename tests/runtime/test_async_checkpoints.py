"""train.checkpoint.async: the same run as synchronous checkpoints, bit for bit, and a kill -9 mid-write
leaves the previous checkpoint as the newest valid one."""

import os
import signal
import subprocess
import sys
import time

import pytest

import moec
from moec.checkpoint import dcp as ckpt
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.conftest import REPO
from tests.runtime.helpers import quick_text

SYNC = quick_text(steps=8, every=2)
ASYNC = SYNC.replace("keep_last: 2}", "keep_last: 2, async: true}")
assert ASYNC != SYNC


def losses(run_dir):
    return [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == "train"]


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sync")
    Trainer(moec.load_spec_text(SYNC, file="sync.yaml"), run_dir=run_dir).run()
    return run_dir


def test_async_checkpoints_train_bit_for_bit_like_synchronous_ones(sync_run, tmp_path):
    Trainer(moec.load_spec_text(ASYNC, file="async.yaml"), run_dir=tmp_path).run()
    assert losses(tmp_path) == losses(sync_run)
    assert [info.step for info in ckpt.list_checkpoints(tmp_path)] == [6, 8]  # keep_last 2 (and the best, step 8)
    for info in ckpt.list_checkpoints(tmp_path):
        ckpt.verify_checkpoint(info.path)
    assert not list(ckpt.checkpoint_root(tmp_path).glob(".tmp-*"))


# A run whose step-4 checkpoint never finishes: its commit blocks after DCP wrote the tensors.
STALLED_WRITER = """
import pathlib, sys, time
import moec
from moec.checkpoint import async_write
from moec.train.trainer import Trainer

real_seal = async_write.seal_checkpoint

def stalled_seal(tmp, step, meta, fingerprint):
    if step == 4:
        pathlib.Path(sys.argv[3]).write_text("writing step 4")
        time.sleep(600)
    real_seal(tmp, step, meta, fingerprint)

async_write.seal_checkpoint = stalled_seal
Trainer(moec.load_spec(sys.argv[1]), run_dir=pathlib.Path(sys.argv[2])).run()
"""


@pytest.mark.slow
def test_kill_9_during_an_async_write_resumes_from_the_previous_checkpoint_bit_for_bit(sync_run, tmp_path):
    spec_path, run_dir, marker = tmp_path / "async.yaml", tmp_path / "run", tmp_path / "writing"
    spec_path.write_text(ASYNC)
    proc = subprocess.Popen([sys.executable, "-c", STALLED_WRITER, str(spec_path), str(run_dir), str(marker)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "the step-4 write never started"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert [info.step for info in ckpt.list_checkpoints(run_dir)] == [2]
    assert list(ckpt.checkpoint_root(run_dir).glob(".tmp-step_00000004-*"))  # the write that never completed
    resumed = Trainer(moec.load_spec(spec_path), run_dir=run_dir, resume="latest-valid")
    assert resumed.start_step == 2
    resumed.run()
    assert losses(run_dir) == losses(sync_run)
