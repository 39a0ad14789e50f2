"""``train.log``: metrics.jsonl always, TensorBoard scalars and W&B (offline) with the same numbers when asked."""

import importlib.util

import pytest

import moec
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.runtime.helpers import quick_text


def spec_with_log(log: str, steps: int = 2):
    text = quick_text(steps=steps, every=2).replace("  eval: {every", f"  log: {log}\n  eval: {{every")
    return moec.load_spec_text(text, file="q.yaml")


def test_tensorboard_gets_the_numbers_of_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(spec_with_log("[jsonl, tensorboard]"), run_dir=tmp_path).run()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    train = [r for r in rows if r["kind"] == "train"]
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [1, 2]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [e.wall_time for e in logged] == pytest.approx([r["time"] for r in train], abs=1e-3)
    (val,) = events.Scalars("eval/val_loss")
    assert (val.step, val.value) == (2, pytest.approx(rows[-1]["val_loss"], rel=1e-6))
    drops = events.Scalars("moe/blocks.0.moe/dropped_fraction")
    assert [e.value for e in drops] == [r["moe"]["blocks.0.moe"]["dropped_fraction"] for r in train]


def test_log_must_start_with_jsonl_and_name_each_logger_once():
    for log in ("[tensorboard]", "[jsonl, jsonl]"):
        with pytest.raises(moec.SpecError, match=r"train.log: must start with 'jsonl' \(metrics.jsonl is the run's record\)"):
            spec_with_log(log)
    with pytest.raises(moec.SpecError, match="train.log\\[1\\]: must be one of 'jsonl', 'tensorboard' or 'wandb', got 'mlflow'"):
        spec_with_log("[jsonl, mlflow]")
    assert list(spec_with_log("[jsonl]").train.log) == ["jsonl"]


def test_wandb_logs_the_numbers_of_metrics_jsonl_offline(tmp_path, monkeypatch):
    """The rows reach wandb.log with metrics.jsonl's numbers (recorded around the real call), and the
    offline run is written under the run directory with the spec as its config."""
    import wandb

    logged, real_init = [], wandb.init

    def init(**kwargs):
        run = real_init(**kwargs)
        real_log = run.log
        run.log = lambda data, step: (logged.append((step, dict(data))), real_log(data, step=step))[1]
        return run

    monkeypatch.setattr(wandb, "init", init)
    spec = spec_with_log("[jsonl, wandb]")
    Trainer(spec, run_dir=tmp_path).run()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert [step for step, data in logged if "train/loss" in data] == [1, 2]
    assert [data["train/loss"] for _, data in logged if "train/loss" in data] == [r["loss"] for r in train]
    assert [data["eval/val_loss"] for _, data in logged if "eval/val_loss" in data] == [rows[-1]["val_loss"]]
    assert logged[0][1]["moe/blocks.0.moe/dropped_fraction"] == train[0]["moe"]["blocks.0.moe"]["dropped_fraction"]
    (offline,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert offline.stat().st_size > 0


def test_a_missing_tensorboard_package_is_a_validation_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(moec.SpecError) as caught:
        spec_with_log("[jsonl, tensorboard]")
    assert [str(i) for i in caught.value.issues] == [
        "q.yaml:30:16: train.log[1]: 'tensorboard' needs the tensorboard package: pip install 'moec[tensorboard]'"]
