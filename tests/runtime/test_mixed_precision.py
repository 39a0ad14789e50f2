"""Mixed precision: every MoE kernel x {fp32, bf16, fp16} x {dropless, capacity} trains a few steps;
fp16 scales the loss (a GradScaler) and counts the steps it skips."""

import math

import pytest
import torch

import moec
from moec.compile import build_model
from moec.dtypes import DTYPES
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.runtime.helpers import quick_text

CAPACITY = "capacity: {mode: capacity, factor: 0.75, drop_policy: renormalize}"
KERNELS = {"dropless": ("grouped_mm", "eager"), "capacity": ("bmm", "grouped_mm", "eager")}
MATRIX = [(mode, kernel, dtype) for mode, kernels in KERNELS.items() for kernel in kernels for dtype in ("fp32", "bf16", "fp16")]



def precision_spec(mode: str, kernel: str, dtype: str, steps: int = 4, compiled: bool = False):
    text = quick_text(steps=steps, every=steps, capacity=CAPACITY if mode == "capacity" else "")
    # compiled: dynamo + AOT autograd trace the step under autocast (what crashed); inductor's codegen would add minutes here
    compile_ = "  compile: {backend: aot_eager}\n" if compiled else "  compile: {enabled: false}\n"
    text = text.replace("schedule:\n  compile: {enabled: false}\n",
                        f"schedule:\n{compile_}  precision: {{compute: {dtype}}}\n  kernels: {{moe: {kernel}}}\n")
    return moec.load_spec_text(text, file=f"{mode}_{kernel}_{dtype}.yaml")


def train_rows(spec, run_dir):
    Trainer(spec, run_dir=run_dir).run()
    return [row for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == "train"]


@pytest.mark.parametrize("mode, kernel, dtype", MATRIX, ids=["-".join(case) for case in MATRIX])
def test_every_kernel_trains_in_every_precision(mode, kernel, dtype, tmp_path):
    spec = precision_spec(mode, kernel, dtype)
    rows = train_rows(spec, tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    skipped = [row.get("skipped_steps", 0) for row in rows]
    applied = [row for row, before in zip(rows, [0] + skipped) if row.get("skipped_steps", 0) == before]
    assert all(math.isfinite(row["loss"]) for row in rows) and all(math.isfinite(row["grad_norm"]) for row in applied)
    assert len(applied) >= 3
    assert rows[-1]["task_loss"] < rows[0]["task_loss"] - 0.05  # it learns
    if mode == "capacity":
        assert any(layer["dropped_fraction"] > 0 for row in rows for layer in row["moe"].values())
    assert ("loss_scale" in rows[-1]) == (dtype == "fp16")


@pytest.mark.parametrize("mode, kernel", [("dropless", "grouped_mm"), ("capacity", "bmm"), ("capacity", "eager")])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_forward_matches_the_fp32_reference(mode, kernel, dtype):
    spec = precision_spec(mode, kernel, dtype)
    model, ref = build_model(spec).eval(), moec.reference_model(spec).eval()
    inputs = ref.example_inputs(batch=2, seq=16)
    with torch.no_grad(), torch.autocast("cpu", dtype=DTYPES[dtype]):
        low, ref_low = model(*inputs), ref(*inputs)
    with torch.no_grad():
        exact = ref(*inputs)
    assert low.output.dtype == DTYPES[dtype]
    tolerance = {"bf16": 0.05, "fp16": 0.01}[dtype]
    for out in (low, ref_low):
        error = (out.output.float() - exact.output).abs().max() / exact.output.abs().max()
        assert error < tolerance
        assert out.aux_loss.float().item() == pytest.approx(exact.aux_loss.item(), rel=tolerance)


def test_fp16_skips_the_steps_whose_gradients_overflow(tmp_path):
    spec = precision_spec("capacity", "bmm", "fp16", steps=3)
    trainer = Trainer(spec, run_dir=tmp_path)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # fp16 gradients overflow at this scale
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.run(stop_at=1)  # one step, then a checkpoint
    rows = [row for row in read_metrics(tmp_path / "metrics.jsonl") if row["kind"] == "train"]
    assert rows[-1]["skipped_steps"] == 1 and rows[-1]["loss_scale"] == 2.0**59
    assert all(torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())  # the step was skipped
    resumed = Trainer(spec, run_dir=tmp_path, resume="latest")
    assert (resumed.skipped_steps, resumed.scaler.get_scale()) == (1, 2.0**59)


def test_fp16_backs_off_from_the_default_scale_once_then_steps(tmp_path):
    # The default initial scale 2^16 overflows this model's fp16 activation gradients once; the scaler halves it.
    rows = train_rows(precision_spec("dropless", "grouped_mm", "fp16", steps=3), tmp_path)
    assert [(row["skipped_steps"], row["loss_scale"]) for row in rows] == [(1, 2.0**15)] * 3
    assert math.isnan(rows[0]["grad_norm"]) and all(math.isfinite(row["grad_norm"]) for row in rows[1:])


@pytest.mark.slow
def test_compiled_bf16_capacity_trains(tmp_path):
    rows = train_rows(precision_spec("capacity", "bmm", "bf16", steps=3, compiled=True), tmp_path)
    assert all(math.isfinite(row["loss"]) for row in rows) and rows[-1]["task_loss"] < rows[0]["task_loss"]
