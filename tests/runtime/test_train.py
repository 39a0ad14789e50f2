"""Training runs: the loss drops, resume is exact, checkpoints survive crashes, bad resumes are refused."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moec
from moec.checkpoint import dcp as ckpt
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer, TrainingError
from tests.conftest import REPO
from tests.runtime.helpers import quick_spec, quick_text

MOEC = Path(sys.executable).parent / "moec"


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == "train"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    result = Trainer(quick_spec(steps=12, every=4), run_dir=run_dir).run()
    return run_dir, result


def test_a_short_run_lowers_the_loss_and_writes_metrics(full_run):
    run_dir, result = full_run
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert sum(r["task_loss"] for r in train[-3:]) / 3 < train[0]["task_loss"] - 0.5
    assert math.log(256) == pytest.approx(train[0]["task_loss"], abs=0.3)  # starts at uniform over bytes
    row = train[-1]
    for key in ("loss", "task_loss", "aux_loss", "aux_load_balance", "aux_z", "lr", "grad_norm", "tokens_per_s", "peak_memory_bytes"):
        assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), key
    assert row["aux_loss"] == pytest.approx(row["aux_load_balance"] + row["aux_z"], rel=1e-5)
    assert list(row["moe"]) == ["blocks.0.moe", "blocks.1.moe"]
    layer = row["moe"]["blocks.0.moe"]
    assert len(layer["utilization"]) == 4 and sum(layer["utilization"]) == pytest.approx(1.0, abs=1e-5)
    assert layer["dropped_fraction"] == 0.0 and 0 < layer["gate_entropy"] <= math.log(4) + 1e-6
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert evals[-1]["val_bits_per_byte"] == pytest.approx(evals[-1]["val_loss"] / math.log(2))
    # warmup 2 steps, then cosine from 3e-3 towards 0.1 x 3e-3: step 12 is 9/10 of the way
    assert train[0]["lr"] == pytest.approx(1.5e-3)
    assert train[-1]["lr"] == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9))))


def test_checkpoints_keep_the_last_two_and_the_best(full_run):
    run_dir, result = full_run
    steps = [info.step for info in ckpt.list_checkpoints(run_dir)]
    assert steps[-2:] == [8, 12] and len(steps) <= 3
    assert not list(ckpt.checkpoint_root(run_dir).glob(".tmp-*"))


def test_resume_is_bitwise_exact(full_run, tmp_path):
    run_dir, _ = full_run
    Trainer(quick_spec(steps=12, every=4), run_dir=tmp_path).run(stop_at=5)
    assert [info.step for info in ckpt.list_checkpoints(tmp_path)][-1] == 5
    Trainer(quick_spec(steps=12, every=4), run_dir=tmp_path, resume="latest").run()
    assert losses(tmp_path) == losses(run_dir)  # exact float equality, every step
    def evals(run):  # the rows without their wall-clock stamps
        rows = read_metrics(run / "metrics.jsonl")
        return [{k: v for k, v in r.items() if k not in ("time", "elapsed_s")} for r in rows if r["kind"] == "eval"]

    assert evals(tmp_path) == evals(run_dir)


def test_resume_before_any_evaluation(tmp_path):
    Trainer(quick_spec(steps=8, every=4), run_dir=tmp_path).run(stop_at=2)  # no eval yet: best_val is null
    resumed = Trainer(quick_spec(steps=8, every=4), run_dir=tmp_path, resume=str(tmp_path / "checkpoints" / "step_00000002"))
    assert resumed.best_val == math.inf and resumed.run().step == 8
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"] == [4, 8]


def test_changed_specs_are_refused_with_the_difference(full_run):
    run_dir, _ = full_run
    wider = moec.load_spec_text(quick_text(steps=12, every=4).replace("d_model: 32", "d_model: 48"), file="q.yaml")
    with pytest.raises(TrainingError, match=r"(?s)model section changed.*\n  model.d_model: 32 -> 48"):
        Trainer(wider, run_dir=run_dir, resume="latest")
    longer = quick_spec(steps=16, every=4)
    with pytest.raises(TrainingError, match=r"--allow-spec-change.*\n  train.steps: 12 -> 16"):
        Trainer(longer, run_dir=run_dir, resume="latest")
    trainer = Trainer(longer, run_dir=run_dir, resume="latest", allow_spec_change=True)
    assert trainer.start_step == 12


def test_a_crash_between_writing_and_renaming_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(quick_spec(steps=8, every=2), run_dir=tmp_path)
    real_commit, calls = ckpt._commit, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash before the rename")
        real_commit(src, dst)

    monkeypatch.setattr(ckpt, "_commit", crash_on_second)
    with pytest.raises(TrainingError, match=r"simulated crash before the rename; the last complete checkpoint is .*step_00000002 \(step 2\)$"):
        trainer.run()  # an OSError while writing is a clean stop naming the last complete checkpoint
    monkeypatch.undo()
    assert [info.step for info in ckpt.list_checkpoints(tmp_path)] == [2]
    assert list(ckpt.checkpoint_root(tmp_path).glob(".tmp-*"))  # the half-written one
    resumed = Trainer(quick_spec(steps=8, every=2), run_dir=tmp_path, resume="latest")
    assert resumed.start_step == 2 and not list(ckpt.checkpoint_root(tmp_path).glob(".tmp-*"))
    assert resumed.run().step == 8


def test_a_nan_stops_the_run_naming_the_step_and_layer(tmp_path):
    trainer = Trainer(quick_spec(steps=8, every=2), run_dir=tmp_path)
    trainer.run(stop_at=2)
    with torch.no_grad():
        dict(trainer.model.named_parameters())["blocks.1.moe.experts.w_down"].fill_(float("nan"))
    trainer.start_step = 2
    with pytest.raises(TrainingError) as caught:
        trainer.run()
    message = str(caught.value)
    assert message.startswith("loss is nan at step 3: the first non-finite activation is %expert_ffn_")
    assert "from quick.yaml:15 model.blocks[0].layers[1].expert" in message  # the spec entry unrolled into blocks 0 and 1
    assert "non-finite parameters: blocks.1.moe.experts.w_down" in message
    assert message.endswith(f"the last good checkpoint is {tmp_path / 'checkpoints' / 'step_00000002'} (step 2)")


def _spawn(spec_path: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(MOEC), "train", str(spec_path), "--run-dir", str(run_dir), "--no-plots", *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_9_during_a_save_leaves_a_loadable_checkpoint_and_a_resumable_run(tmp_path):
    spec_path = tmp_path / "quick.yaml"
    spec_path.write_text(quick_text(steps=400, every=1))
    run_dir = tmp_path / "run"
    root = ckpt.checkpoint_root(run_dir)
    proc = _spawn(spec_path, run_dir)
    deadline, caught_mid_save = time.monotonic() + 300, False  # generous: a loaded machine compiles slowly
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(ckpt.list_checkpoints(run_dir)) >= 2 and any(root.glob(".tmp-*")):
                os.kill(proc.pid, signal.SIGKILL)  # while a checkpoint is half written
                caught_mid_save = True
                break
            time.sleep(0.0005)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert caught_mid_save, "never saw a save in progress"
    complete = ckpt.list_checkpoints(run_dir)
    trainer = Trainer(moec.load_spec(spec_path), run_dir=tmp_path / "probe")
    for info in complete:  # every complete checkpoint loads
        ckpt.load_checkpoint(info.path, trainer.model, trainer.optimizer)
    resumed = subprocess.run([str(MOEC), "train", str(spec_path), "--run-dir", str(run_dir), "--no-plots", "--resume",
                              "--allow-spec-change", "--stop-at", str(complete[-1].step + 2)], cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert ckpt.list_checkpoints(run_dir)[-1].step == complete[-1].step + 2


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    spec_path = tmp_path / "quick.yaml"
    spec_path.write_text(quick_text(steps=400, every=400))
    run_dir = tmp_path / "run"
    proc = _spawn(spec_path, run_dir)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.05)
    while time.monotonic() < deadline and len((run_dir / "metrics.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM at step" in err and "Traceback" not in err
    saved = ckpt.list_checkpoints(run_dir)
    assert len(saved) == 1 and saved[0].step == len(losses(run_dir))


def test_plot_command_writes_readable_pngs(full_run):
    from typer.testing import CliRunner

    from moec.cli.main import app

    run_dir, _ = full_run
    result = CliRunner().invoke(app, ["plot", str(run_dir)])
    assert result.exit_code == 0, result.output
    for name in ("loss.png", "experts.png", "throughput.png"):
        data = (run_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert CliRunner().invoke(app, ["plot", str(run_dir / "nope")]).exit_code == 1
