"""Run directories that never lose work: the fresh-run rule, --overwrite, --resume as a flag, the lock."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moec.checkpoint import dcp as ckpt
from moec.checkpoint.rundir import LOCK, RunLock, claim
from moec.observe.metrics import read_metrics
from tests.conftest import REPO
from tests.hostile.helpers import moec_cli, tree_digest, write_spec


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """``moec train quick.yaml train.steps=2``: checkpoints at steps 1 and 2 (copy it before changing it)."""
    root = tmp_path_factory.mktemp("rundir")
    spec_path = write_spec(root, steps=4, every=1)
    result = moec_cli("train", spec_path, "train.steps=2", "--run-dir", root / "run", "--no-plots")
    assert result.exit_code == 0, result.output
    return spec_path, root / "run"


def copied(two_step_run, tmp_path) -> tuple[Path, Path]:
    spec_path, run = two_step_run
    return spec_path, Path(shutil.copytree(run, tmp_path / "run"))


def train_steps(run: Path) -> list[int]:
    return [row["step"] for row in read_metrics(run / "metrics.jsonl") if row["kind"] == "train"]


def test_the_run_records_its_overrides(two_step_run):
    _, run = two_step_run
    meta = json.loads((run / "checkpoints" / "step_00000002" / ckpt.META).read_text())
    assert meta["overrides"] == ["train.steps=2"] and meta["spec"]["train"]["steps"] == 2
    spec_yaml = (run / "spec.yaml").read_text()
    assert spec_yaml.splitlines()[:2] == [f"# resolved by moec from {run.parent / 'quick.yaml'}", '# override: "train.steps=2"']
    assert "  steps: 2\n" in spec_yaml
    assert (run / LOCK).read_text() == ""  # released at the end


def test_a_fresh_run_refuses_a_directory_holding_a_run(two_step_run, tmp_path):
    spec_path, run = copied(two_step_run, tmp_path)
    before = tree_digest(run)
    result = moec_cli("train", spec_path, "train.steps=2", "--run-dir", run, "--no-plots")
    assert result.exit_code == 1
    assert result.stderr == (f"error: {run} already holds a run (metrics.jsonl with 4 row(s), checkpoints up to step 2); "
                             "continue it with --resume, start over with --overwrite (deletes it), or pick another --run-dir\n")
    assert tree_digest(run) == before  # nothing truncated, nothing added


def test_overwrite_starts_afresh_and_keeps_unrelated_files(two_step_run, tmp_path):
    spec_path, run = copied(two_step_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    result = moec_cli("train", spec_path, "train.steps=2", "train.checkpoint.every=2", "--run-dir", run, "--no-plots", "--overwrite")
    assert result.exit_code == 0, result.output
    assert train_steps(run) == [1, 2]  # not [1, 2, 1, 2]
    assert [info.step for info in ckpt.list_checkpoints(run)] == [2]  # the old run's step 1 is gone
    assert (run / "notes.txt").read_text() == "mine"
    result = moec_cli("train", spec_path, "--run-dir", run, "--overwrite", "--resume")
    assert result.exit_code == 2 and "--overwrite starts afresh; it cannot be combined with --resume" in result.output


def test_resume_is_a_flag_that_cannot_swallow_the_spec(two_step_run, tmp_path):
    spec_path, run = copied(two_step_run, tmp_path)
    result = moec_cli("train", spec_path, "train.steps=2", "--resume-from", run / "checkpoints" / "step_00000001",
                      "--run-dir", run, "--no-plots")
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.stdout and train_steps(run) == [1, 2]
    result = moec_cli("train", "--resume", spec_path, "train.steps=3", "--run-dir", run, "--no-plots", "--allow-spec-change")
    assert result.exit_code == 0, result.output
    assert train_steps(run) == [1, 2, 3]


def test_resuming_with_other_overrides_is_a_spec_change(two_step_run, tmp_path):
    spec_path, run = copied(two_step_run, tmp_path)
    result = moec_cli("train", spec_path, "train.steps=3", "--run-dir", run, "--no-plots", "--resume")
    assert result.exit_code == 1
    assert result.stderr == ("error: cannot resume: the spec changed since the checkpoint (pass --allow-spec-change to accept):\n"
                             "  train.steps: 2 -> 3\n"
                             "  (command-line overrides then: train.steps=2; now: train.steps=3)\n")
    result = moec_cli("train", spec_path, "model.blocks[0].layers[1].experts=8", "train.steps=2", "--run-dir", run,
                      "--no-plots", "--resume")
    assert result.exit_code == 1 and result.stderr.startswith(
        "error: cannot resume: the model section changed since the checkpoint:\n  model.blocks[0].layers[1].experts: 4 -> 8\n")


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    spec_path, run = write_spec(tmp_path, steps=2, every=2), tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from moec.checkpoint.rundir import RunLock; "
                               f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        result = moec_cli("train", spec_path, "--run-dir", run, "--no-plots")
        owner = json.loads((run / LOCK).read_text())
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1
    assert result.stderr == (f"error: {run} is in use by another moec train (pid {holder.pid} on {socket.gethostname()}, "
                             f"started {owner['started']}: {owner['command']}); wait for it to finish, stop it, or use "
                             "another --run-dir\n")
    assert not (run / "metrics.jsonl").exists()
    result = moec_cli("train", spec_path, "--run-dir", run, "--no-plots")  # the holder died: its lock is stale
    assert result.exit_code == 0, result.output
    assert f"took over a stale lock: pid {holder.pid} (started {owner['started']}) is no longer running" in result.stdout


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00+00:00", "command": "moec train x"}))
    with pytest.raises(ValueError) as caught:
        RunLock(run).acquire()
    assert str(caught.value) == (f"{run / LOCK} names a run on another host (pid 1 on elsewhere, started "
                                 f"2026-01-01T00:00:00+00:00: moec train x); if that run is over, delete {run / LOCK}")
    os.unlink(run / LOCK)
    claim(run, resume=False, overwrite=False).release()  # an empty directory: nothing to refuse


@pytest.mark.slow
def test_two_processes_refuse_together_without_hanging(two_step_run, tmp_path):
    """Under --nproc only rank 0 looks at the directory; its refusal reaches rank 1, and both exit."""
    spec_path, run = copied(two_step_run, tmp_path)
    ddp = spec_path.read_text().replace("schedule:\n", "mesh: {world_size: 2, axes: {dp: 2}}\nsharding: {batch: [dp]}\nschedule:\n")
    (tmp_path / "ddp.yaml").write_text(ddp)
    done = subprocess.run([str(Path(sys.executable).parent / "moec"), "train", str(tmp_path / "ddp.yaml"), "--nproc", "2",
                           "--run-dir", str(run), "--no-plots"], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1
    refusal = f"{run} already holds a run (metrics.jsonl with 4 row(s), checkpoints up to step 2)"
    assert f"error: {refusal}" in done.stderr and f"error on rank 1: {refusal}" in done.stderr
