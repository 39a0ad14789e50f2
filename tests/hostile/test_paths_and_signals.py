"""Unwritable paths are one line; SIGINT stops a long evaluation quickly; a second SIGINT exits 130."""

import os
import signal
import time

import moec
from moec.checkpoint import dcp as ckpt
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.hostile.helpers import moec_cli, write_spec
from tests.runtime.helpers import quick_text

import pytest


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Python's own SIGINT handler during each test, as in a terminal: a shell that starts the suite in
    the background hands it SIGINT ignored, and the tests check that training restores the handler."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_build_output_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    result = moec_cli("build", "specs/token_routed_tiny.yaml", "-o", tmp_path / "file" / "out")
    assert result.exit_code == 1
    assert result.stderr == f"error: cannot write the program: {tmp_path}/file/out: Not a directory\n"


def test_an_unwritable_program_cache_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("MOEC_CACHE_DIR", str(tmp_path / "file" / "cache"))
    result = moec_cli("train", write_spec(tmp_path), "--run-dir", tmp_path / "run", "--no-plots")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot write {tmp_path}/file/cache/") and result.stderr.endswith(": Not a directory\n")
    assert len(result.stderr.splitlines()) == 1


def test_a_run_directory_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    result = moec_cli("train", write_spec(tmp_path), "--run-dir", tmp_path / "run", "--no-plots")
    assert result.exit_code == 1
    assert result.stderr == f"error: cannot write {tmp_path}/run: File exists\n"
    assert (tmp_path / "run").read_text() == "not a directory"


def _long_eval_spec():
    text = quick_text(steps=8, every=4).replace("eval: {every: 4, batches: 2}", "eval: {every: 4, batches: 5000}")
    return moec.load_spec_text(text, file="long_eval.yaml")


def _signal_during_eval(trainer, monkeypatch, count):
    """Send SIGINT ``count`` times once the evaluation has drawn 3 batches; record batches drawn after."""
    drawn = []
    real_batch = trainer.data.batch

    def batch(split, index, size):
        if split == "val":
            drawn.append(time.monotonic())
            if len(drawn) == 3:
                for _ in range(count):
                    os.kill(os.getpid(), signal.SIGINT)
        return real_batch(split, index, size)

    monkeypatch.setattr(trainer.data, "batch", batch)
    return drawn


def test_sigint_during_a_long_evaluation_stops_within_a_batch_and_saves(tmp_path, monkeypatch):
    trainer = Trainer(_long_eval_spec(), run_dir=tmp_path)
    drawn = _signal_during_eval(trainer, monkeypatch, count=1)
    result = trainer.run()
    assert result.interrupted == "SIGINT" and result.step == 4
    assert len(drawn) == 3  # no batch after the signal: 4997 evaluation batches were not run
    assert ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step_00000004").step == 4
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # no eval row from a partial mean
    resumed = Trainer(_long_eval_spec(), run_dir=tmp_path, resume="latest")
    assert resumed.start_step == 4


def test_a_second_sigint_aborts_at_once_and_the_cli_exits_130(tmp_path, monkeypatch):
    spec_path = tmp_path / "long_eval.yaml"
    spec_path.write_text(quick_text(steps=8, every=4).replace("eval: {every: 4, batches: 2}", "eval: {every: 4, batches: 5000}"))
    from moec.data import datasets as data_mod

    real_batch, drawn = data_mod.TextBytes.batch, []

    def batch(self, split, index, size):
        if split == "val":
            drawn.append(index)
            if len(drawn) == 3:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
        return real_batch(self, split, index, size)

    monkeypatch.setattr(data_mod.TextBytes, "batch", batch)
    result = moec_cli("train", spec_path, "--run-dir", tmp_path / "run", "--no-plots")
    assert result.exit_code == 130
    assert result.stderr == "error: stopped by a second SIGINT without saving; no checkpoint was written yet\n"
    assert len(drawn) == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_an_unreadable_checkpoint_directory_is_one_line(finished_run, tmp_path, monkeypatch):
    from pathlib import Path

    spec_path, run_dir = finished_run
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self.name == "checkpoints":
            raise PermissionError(13, "Permission denied")  # what chmod 000 gives a non-root user
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    result = moec_cli("train", spec_path, "--run-dir", run_dir, "--resume", "--no-plots")
    assert result.exit_code == 1
    assert result.stderr == f"error: cannot resume: {run_dir}/checkpoints: cannot read (Permission denied)\n"


def test_a_signal_after_the_loop_has_stopped_still_exits_130_without_a_traceback(tmp_path, monkeypatch):
    # The second SIGINT often lands after the first one's save, while the summary is printed.
    from moec.observe import display as display_mod

    spec_path = write_spec(tmp_path, steps=2, every=2)
    real_summary = display_mod.Display.summary

    def summary(self, trainer, result):
        os.kill(os.getpid(), signal.SIGINT)
        return real_summary(self, trainer, result)

    monkeypatch.setattr(display_mod.Display, "summary", summary)
    result = moec_cli("train", spec_path, "--run-dir", tmp_path / "run", "--no-plots")
    assert result.exit_code == 130
    assert result.stderr == ("error: stopped by SIGINT outside the training loop (building, loading or reporting); "
                             "checkpoints already written are kept\n")
    assert ckpt.verify_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002").step == 2  # the run's own save stands
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_two_real_sigints_during_an_evaluation_exit_130_not_by_the_signal(tmp_path):
    # End to end, as a user at a terminal: the process must exit with status 130, not be killed by SIGINT (-2).
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import REPO

    spec_path = tmp_path / "long_eval.yaml"
    spec_path.write_text(quick_text(steps=8, every=4).replace("eval: {every: 4, batches: 2}", "eval: {every: 4, batches: 5000}"))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moec"), "train", str(spec_path), "--run-dir", str(run_dir),
                             "--no-plots"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        time.sleep(0.05)
    time.sleep(0.5)  # inside the 5000-batch evaluation after step 4
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < 15 and "Traceback" not in err
    assert err.splitlines()[-1] in (  # which one depends on where the second signal lands
        "error: stopped by a second SIGINT without saving; no checkpoint was written yet",  # during the save
        f"stopped by SIGINT at step 4; resume with: moec train {spec_path} --resume",  # after it: ignored while exiting
        "error: stopped by SIGINT outside the training loop (building, loading or reporting); checkpoints already written are kept",
    )
    assert [r["step"] for r in read_metrics(metrics) if r["kind"] == "train"] == [1, 2, 3, 4]
