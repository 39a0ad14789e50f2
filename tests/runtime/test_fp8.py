"""``schedule.precision.compute: fp8``: the projections become torchao Float8Linear (rowwise scales), emulated on
the CPU; numerics against fp32 and bf16, a few training steps, the device rule and the generated parallel.py.

Tolerances: e4m3 keeps 3 mantissa bits, so one cast rounds by up to 2^-4 (6%) of a value; measured on this
model (seed 0), fp8 logits are 2.9% (norm-relative) off fp32 where bf16's are 0.5%, and the converted
projections' weight gradients 6-8.5% off (bf16: under 1%). The bounds below are about twice those.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import moec
from moec.compile import build_model, compile_spec, parallel_module
from moec.observe.metrics import read_metrics
from moec.train.precision import fp8_emulated
from moec.train.trainer import Trainer, TrainingError
from tests.runtime.helpers import quick_text

torchao = pytest.importorskip("torchao")
from torchao.float8.float8_linear import Float8Linear

LOGITS_TOLERANCE = 0.06  # measured 0.029
PROJECTION_GRAD_TOLERANCE = 0.15  # measured 0.06 - 0.085


def fp8_spec(steps: int = 2, extra: str = ""):
    """The quick MoE model with a dense MLP too (both nn.Linear kinds), d_model 64, compute fp8."""
    text = quick_text(steps=steps, every=steps).replace("d_model: 32", "d_model: 64")
    text = text.replace("        - kind: moe", "        - kind: mlp\n          hidden: 64\n        - kind: moe")
    text = text.replace("schedule:\n", f"schedule:\n  precision: {{compute: fp8}}\n{extra}")
    return moec.load_spec_text(text, file="fp8.yaml")


def converted_model(spec):
    program = compile_spec(spec)
    model = build_model(spec, program=program)
    return model, parallel_module(program).float8_training(copy.deepcopy(model), emulate=True)


def test_fp8_converts_the_projections_and_keeps_head_routers_and_experts_bf16():
    model, fp8 = converted_model(fp8_spec())
    modules = dict(fp8.named_modules())
    for block in ("blocks.0", "blocks.1"):
        for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "mlp.w_up", "mlp.w_down"):
            assert type(modules[f"{block}.{name}"]) is Float8Linear, name
        assert type(modules[f"{block}.moe.router"]) is torch.nn.Linear
    assert type(modules["head"]) is torch.nn.Linear
    assert sum(type(m) is Float8Linear for m in modules.values()) == 12
    # the master weights are the same fp32 tensors under the same names (checkpoints do not change)
    assert {n: p.dtype for n, p in fp8.named_parameters()} == {n: p.dtype for n, p in model.named_parameters()}
    assert all(torch.equal(p, model.state_dict()[n]) for n, p in fp8.state_dict().items())


def _step(model, inputs):
    """Logits (fp32) and parameter gradients of one next-token loss under bf16 autocast, or fp32 without."""
    model.zero_grad()
    out = model(*inputs).output
    targets = torch.roll(inputs[0], -1, 1)
    F.cross_entropy(out.float().reshape(-1, out.shape[-1]), targets.reshape(-1)).backward()
    return out.float().detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _relative(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_fp8_emulated_forward_and_backward_are_within_tolerance_of_fp32():
    model, fp8 = converted_model(fp8_spec())
    inputs = model.example_inputs(batch=4, seq=32)
    exact, exact_grads = _step(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, _ = _step(model, inputs)
        low, low_grads = _step(fp8, inputs)
    assert _relative(low, exact) < LOGITS_TOLERANCE
    assert _relative(low, exact) > 2 * _relative(bf16, exact)  # the e4m3 casts did happen (bf16 alone is 5x closer)
    projections = [n for n in exact_grads if n.endswith(("wq.weight", "wo.weight", "w_up.weight", "w_down.weight"))]
    assert len(projections) == 8
    for name in projections:
        assert _relative(low_grads[name], exact_grads[name]) < PROJECTION_GRAD_TOLERANCE, name


def test_fp8_trains_a_few_steps_emulated_on_the_cpu(tmp_path):
    spec = fp8_spec(steps=4)
    trainer = Trainer(spec, run_dir=tmp_path)
    assert type(trainer.model.blocks[0].attention.wq) is Float8Linear
    trainer.run()
    rows = [row for row in read_metrics(tmp_path / "metrics.jsonl") if row["kind"] == "train"]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([row["loss"], row["grad_norm"]])).all() for row in rows)
    assert rows[-1]["task_loss"] < rows[0]["task_loss"] - 0.05  # it learns


def test_fp8_runs_on_sm89_and_newer_and_emulates_on_the_cpu(monkeypatch):
    assert fp8_emulated(torch.device("cpu")) is True
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_emulated(torch.device("cuda")) is False
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="compute capability >= 8.9 .* this device is sm80: use bf16"):
        fp8_emulated(torch.device("cuda"))


def test_an_a100_is_refused_at_launch_in_one_line(monkeypatch, tmp_path):
    from moec.train import precision

    monkeypatch.setattr(precision, "fp8_emulated", lambda device: (_ for _ in ()).throw(ValueError("needs sm89")))
    with pytest.raises(TrainingError, match="^needs sm89$"):
        Trainer(fp8_spec(), run_dir=tmp_path)


def test_parallel_py_shows_the_conversion_and_what_stays_bf16():
    source = compile_spec(fp8_spec()).parallel_source
    assert 'config = dataclasses.replace(Float8LinearConfig.from_recipe_name("rowwise"), emulate=emulate)' in source
    assert "convert_to_float8_training(model, config=config, module_filter_fn=is_float8_linear)" in source
    assert ("FLOAT8_LINEARS = ('blocks.attention.wq', 'blocks.attention.wk', 'blocks.attention.wv', 'blocks.attention.wo', "
            "'blocks.mlp.w_up', 'blocks.mlp.w_down')") in source
    assert "'head': \"the output head: logits stay bf16 (torchtitan's default)\"" in source
    assert "float8_training" not in compile_spec(moec.load_spec_text(quick_text(), file="q.yaml")).parallel_source


def test_narrow_projections_stay_bf16_and_are_named():
    spec = moec.load_spec("specs/deepseek_v3_tiny.yaml", overrides=["schedule.precision.compute=fp8"])
    parallel = parallel_module(compile_spec(spec))
    assert parallel.FLOAT8_KEPT["blocks.mla.wkv_a"] == "64 -> 40 features, not both multiples of 16"
    assert "blocks.mla.wq_a" in parallel.FLOAT8_LINEARS


def test_fp8_without_torchao_is_refused_at_the_compute_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(moec.SpecError, match=r"fp8.yaml:\d+:\d+: schedule.precision.compute: 'fp8' needs torchao"):
        fp8_spec()


def test_a_model_without_a_projection_to_convert_is_refused_at_launch(tmp_path):
    text = quick_text().replace("        - kind: attention\n          heads: 2\n", "")  # MoE layers only: no nn.Linear to convert
    spec = moec.load_spec_text(text.replace("schedule:\n", "schedule:\n  precision: {compute: fp8}\n"), file="moe_only.yaml")
    with pytest.raises(TrainingError, match=r"^schedule.precision.compute fp8 converts no projection of this model \(kept bf16: head;"):
        Trainer(spec, run_dir=tmp_path)
