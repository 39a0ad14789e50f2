"""The manifest's memory per device against what the trainer holds after its first step."""

import torch

import moec
from moec.observe.memory_plan import held_bytes, local_bytes, plan_check
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.runtime.helpers import quick_text


def test_single_process_holds_exactly_the_plan(tmp_path):
    spec = moec.load_spec_text(quick_text(steps=2, every=10), file="q.yaml")
    Trainer(spec, run_dir=tmp_path).run()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    plan = rows[0]["memory_plan"]
    params = moec.compile_spec(spec).manifest["parameters"]["total"]
    assert plan["held"] == {"params_bytes": 4 * params, "grads_bytes": 4 * params, "optimizer_bytes": 8 * params,
                            "total_bytes": 16 * params}  # fp32 weights and gradients, AdamW's two fp32 moments
    assert plan["planned"] == plan["held"] and plan["held_over_planned"] == 1.0
    assert "memory_plan" not in rows[1]  # measured once, on the first step


def test_held_bytes_counts_what_exists():
    model = torch.nn.Linear(4, 3, bias=False)
    optimizer = torch.optim.AdamW(model.parameters())
    assert held_bytes(model, optimizer) == {"params_bytes": 48, "grads_bytes": 0, "optimizer_bytes": 0}
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    assert held_bytes(model, optimizer) == {"params_bytes": 48, "grads_bytes": 48, "optimizer_bytes": 96}  # step: not counted
    assert local_bytes(torch.ones(5, dtype=torch.bfloat16)) == 10
    manifest = {"memory_per_device": {"params_bytes": 48, "grads_bytes": 48, "optimizer_bytes": 100, "total_bytes": 196}}
    assert plan_check(held_bytes(model, optimizer), manifest)["held_over_planned"] == 192 / 196
