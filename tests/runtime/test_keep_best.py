"""train.checkpoint.keep_best: N keeps the N checkpoints with the lowest validation loss besides the newest ones."""

import moec
from moec.checkpoint import dcp as ckpt
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.runtime.helpers import quick_text


def run_with(tmp_path, keep_best: str, steps: int = 6, stop_at: int | None = None, resume: str | None = None):
    text = quick_text(steps=steps, every=1).replace("keep_last: 2}", f"keep_last: 1, keep_best: {keep_best}}}")
    text = text.replace("lr: 3.0e-3", "lr: 3.0e-2")  # a large step: the validation loss goes up and down
    spec = moec.load_spec_text(text, file="best.yaml")
    Trainer(spec, run_dir=tmp_path, resume=resume).run(stop_at=stop_at)
    evals = {row["step"]: row["val_loss"] for row in read_metrics(tmp_path / "metrics.jsonl") if row["kind"] == "eval"}
    return evals, [info.step for info in ckpt.list_checkpoints(tmp_path)]


def test_keep_best_three_keeps_the_three_lowest_validation_losses_and_the_last(tmp_path):
    evals, kept = run_with(tmp_path, "3")
    best = sorted(evals, key=lambda step: (evals[step], step))[:3]
    assert sorted(kept) == sorted(set(best) | {6})
    assert len(kept) in (3, 4)


def test_keep_best_false_keeps_only_the_last(tmp_path):
    assert run_with(tmp_path, "false")[1] == [6]


def test_keep_best_survives_a_resume(tmp_path):
    run_with(tmp_path, "2", stop_at=3)
    evals, kept = run_with(tmp_path, "2", resume="latest")
    best = sorted(evals, key=lambda step: (evals[step], step))[:2]
    assert sorted(kept) == sorted(set(best) | {6})
