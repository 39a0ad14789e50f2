"""kernels.moe auto by measurement (moec.bench.kernel_choice): the table is written, read back without
timing, refused when damaged; a forced kernel or the fixed rule times nothing; the choice runs."""

import json

import pytest
import torch
from typer.testing import CliRunner

import moec
from moec.bench import kernel_choice
from moec.cli.main import app
from moec.compile import build_model, compile_spec

TINY = ("train.batch=2", "train.seq_len=16")  # 32 tokens per step: a measurement in well under a second


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """Measurement on (conftest turns it off), one repetition, an empty cache directory."""
    monkeypatch.delenv(kernel_choice.ENV, raising=False)
    monkeypatch.setenv("MOEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernel_choice, "REPS", 1)
    return tmp_path / "cache" / kernel_choice.CACHE_NAME


def _spec(*overrides, path="specs/token_routed_tiny.yaml"):
    return moec.load_spec(path, overrides=TINY + overrides)


def _seed_table(path, spec, entry):
    """The table's row for the spec's one moe layer on the CPU, as if timed before."""
    (_, cfg, layer_yaml), = kernel_choice._moe_layers(spec)
    kernel_choice.write_entry(path, kernel_choice.table_key(spec, cfg, layer_yaml, "cpu"), entry)


def _no_timing(*args, **kwargs):
    raise AssertionError("measured, but the table (or the spec) should have decided")


def test_first_choice_is_timed_and_written_then_read_back_without_timing(measuring, monkeypatch):
    spec = _spec()
    first = kernel_choice.choose_moe_kernels(spec, "cpu")
    (layer,) = first.layers
    assert layer.source == "measured" and set(layer.timings_ms) == {"grouped_mm", "eager"}  # dropless: no bmm, no triton on cpu
    assert all(ms > 0 for ms in layer.timings_ms.values())
    assert layer.kernel == min(layer.timings_ms, key=layer.timings_ms.get)
    assert "N=32 " in layer.key and "D=64 H=128 E=4 top-2" in layer.key and "swiglu dropless" in layer.key
    table = json.loads(measuring.read_text())
    assert table["entries"][layer.key] == {"kernel": layer.kernel, "timings_ms": layer.timings_ms}

    monkeypatch.setattr(kernel_choice, "measure_layer", _no_timing)
    second = kernel_choice.choose_moe_kernels(spec, "cpu")
    assert [(c.kernel, c.timings_ms, c.source) for c in second.layers] == [(layer.kernel, layer.timings_ms, "cached")]
    assert compile_spec(spec, kernel_choice=first).source == compile_spec(spec, kernel_choice=second).source
    for ms in layer.timings_ms.values():
        assert f"{kernel_choice.format_ms(ms)} ms" in second.line()
    assert [kernel_choice.format_ms(ms) for ms in (0.04123, 3.14159, 1263.7)] == ["0.0412", "3.14", "1264"]


def test_the_program_runs_the_table_s_kernel(measuring):
    spec = _spec()
    _seed_table(measuring, spec, {"kernel": "eager", "timings_ms": {"eager": 1.0, "grouped_mm": 2.0}})
    choice = kernel_choice.choose_moe_kernels(spec, "cpu")
    program = compile_spec(spec, kernel_choice=choice)
    assert "# kernels: moe=auto (measured: eager)," in program.source and "experts via eager" in program.source
    assert program.manifest["kernel_choice"]["layers"][0]["timings_ms"] == {"eager": 1.0, "grouped_mm": 2.0}
    fixed = compile_spec(spec)
    assert "experts via grouped_mm" in fixed.source and "kernel_choice" not in fixed.manifest
    # both programs compute the same layer
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (2, 16))
    measured_out = build_model(spec, program=program)(tokens).output
    fixed_out = build_model(spec, program=fixed)(tokens).output
    torch.testing.assert_close(measured_out, fixed_out, rtol=1e-5, atol=1e-5)


def test_capacity_layers_choose_among_kernels_that_serve_capacity(measuring):
    spec = _spec("model.blocks[0].layers[1].capacity.mode=capacity", "model.blocks[0].layers[1].capacity.factor=1.25")
    (layer,) = kernel_choice.choose_moe_kernels(spec, "cpu").layers
    assert set(layer.timings_ms) == {"grouped_mm", "eager", "bmm"} and "capacity" in layer.key
    assert kernel_choice.candidate_kernels(True, "cpu") == ("grouped_mm", "eager")


def test_a_table_entry_the_layer_cannot_run_is_measured_again(measuring):
    spec = _spec()
    _seed_table(measuring, spec, {"kernel": "bmm", "timings_ms": {"bmm": 0.1}})  # bmm cannot serve dropless
    (layer,) = kernel_choice.choose_moe_kernels(spec, "cpu").layers
    assert layer.source == "measured" and layer.kernel in ("grouped_mm", "eager")


def test_a_forced_kernel_reads_and_writes_no_table(measuring, monkeypatch):
    monkeypatch.setattr(kernel_choice, "measure_layer", _no_timing)
    choice = kernel_choice.choose_moe_kernels(_spec("schedule.kernels.moe=grouped_mm"), "cpu")
    assert choice.layers == () and choice.line() == "kernels.moe grouped_mm (forced by the spec)"
    assert not measuring.exists()


@pytest.mark.parametrize("how, note", [
    ("spec", "schedule.kernels.measure is false"),
    ("env", "MOEC_KERNEL_CHOICE=fixed in the environment"),
])
def test_the_fixed_rule_when_measurement_is_off(measuring, monkeypatch, how, note):
    monkeypatch.setattr(kernel_choice, "measure_layer", _no_timing)
    if how == "env":
        monkeypatch.setenv(kernel_choice.ENV, "fixed")
    choice = kernel_choice.choose_moe_kernels(_spec(*(["schedule.kernels.measure=false"] if how == "spec" else [])), "cpu")
    assert choice.line() == f"kernels.moe auto -> fixed rule, not measured ({note})"
    assert not measuring.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: it would measure")
def test_building_for_cuda_without_one_says_it_did_not_measure(measuring, monkeypatch):
    monkeypatch.setattr(kernel_choice, "measure_layer", _no_timing)
    choice = kernel_choice.choose_moe_kernels(_spec(), "cuda")
    assert choice.note == "building for cuda on a machine without a CUDA device"


@pytest.mark.parametrize("damage", ["{not json", '{"version": 1, "entries": {"k": {"kernel": "fastest", "timings_ms": {}}}}',
                                    '{"version": 99, "entries": {}}'])
def test_a_damaged_table_is_ignored_in_one_line_and_rewritten(measuring, damage):
    measuring.parent.mkdir(parents=True)
    measuring.write_text(damage)
    lines = []
    choice = kernel_choice.choose_moe_kernels(_spec(), "cpu", log=lines.append)
    assert lines == [f"warning: ignoring {measuring}: not a moec kernel-choice table (version 1); measuring again"]
    assert choice.layers[0].source == "measured"
    assert list(json.loads(measuring.read_text())["entries"]) == [choice.layers[0].key]


def test_build_prints_the_choice_and_bench_shows_its_table(measuring, tmp_path):
    runner = CliRunner()
    built = runner.invoke(app, ["build", "specs/token_routed_tiny.yaml", *TINY, "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert built.exit_code == 0, built.output
    line = built.stdout.splitlines()[0]
    assert line.startswith("kernels.moe auto -> ") and "(measured: " in line and str(measuring) in line
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (layer,) = manifest["kernel_choice"]["layers"]
    assert layer["source"] == "measured" and layer["kernel"] in ("grouped_mm", "eager")

    shown = runner.invoke(app, ["bench", "specs/token_routed_tiny.yaml", *TINY, "--kernels", "--json"])
    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.stdout)
    assert record["layers"][0] | {"source": "measured"} == layer  # read from the table, not timed again
    assert record["layers"][0]["source"] == "cached"
    table = runner.invoke(app, ["bench", "specs/token_routed_tiny.yaml", *TINY, "--kernels"])
    for kernel, ms in layer["timings_ms"].items():
        assert kernel in table.stdout and f"{ms:.3f}" in table.stdout


def test_a_candidate_that_fails_is_dropped_in_one_line(measuring, monkeypatch):
    monkeypatch.setattr(kernel_choice, "candidate_kernels", lambda dropless, device: ("grouped_mm", "bmm"))  # bmm: dropless refuses it
    lines = []
    (layer,) = kernel_choice.choose_moe_kernels(_spec(), "cpu", log=lines.append).layers
    assert layer.kernel == "grouped_mm" and list(layer.timings_ms) == ["grouped_mm"]
    assert len(lines) == 1 and lines[0].startswith("warning: kernels.moe auto: bmm failed on cpu (SpecError: ")


def test_each_distinct_layer_gets_its_own_choice_and_the_program_runs_each(measuring):
    from tests.passes.helpers import MOE, spec_with

    def named(name, layer=MOE):
        return layer.replace("- kind: moe\n", f"- kind: moe\n          name: {name}\n")

    # the third layer repeats the first: one function, one choice
    spec = spec_with(named("first") + named("second", MOE.replace("top_k: 2", "top_k: 1")) + named("third"), name="two_moe")
    table = {}
    for where, cfg, layer_yaml in kernel_choice._moe_layers(spec):
        kernel = "eager" if cfg.top_k == 1 else "grouped_mm"
        table[where] = kernel
        kernel_choice.write_entry(measuring, kernel_choice.table_key(spec, cfg, layer_yaml, "cpu"),
                                  {"kernel": kernel, "timings_ms": {"eager": 2.0, "grouped_mm": 1.0} if kernel == "grouped_mm"
                                   else {"eager": 1.0, "grouped_mm": 2.0}})
    assert table == {"model.blocks[0].layers[0]": "grouped_mm", "model.blocks[0].layers[1]": "eager"}
    choice = kernel_choice.choose_moe_kernels(spec, "cpu")
    assert choice.line().startswith("kernels.moe auto -> model.blocks[0].layers[0]: grouped_mm (cached: grouped_mm 1 ms, eager 2 ms); "
                                    "model.blocks[0].layers[1]: eager (cached: eager 1 ms, grouped_mm 2 ms); table in ")
    program = compile_spec(spec, kernel_choice=choice)
    assert "# kernels: moe=auto (measured: grouped_mm, eager)," in program.source
    assert "top-2 of 4 experts, dropless, swiglu experts via grouped_mm" in program.source
    assert "top-1 of 4 experts, dropless, swiglu experts via eager" in program.source
    out = build_model(spec, program=program)(torch.randint(0, 256, (2, 8))).output
    assert torch.isfinite(out).all()


def test_training_starts_with_the_choice_line_and_runs_the_chosen_kernel(measuring, tmp_path):
    from moec.train.trainer import Trainer

    spec = _spec("train.steps=2", "train.lr_schedule.warmup_steps=1")
    _seed_table(measuring, spec, {"kernel": "eager", "timings_ms": {"eager": 1.0, "grouped_mm": 2.0}})

    class Display:
        def __init__(self):
            self.lines = []

        def log(self, line):
            self.lines.append(line)

    display = Display()
    trainer = Trainer(spec, run_dir=tmp_path / "run", device="cpu", display=display)
    assert f"kernels.moe auto -> eager (cached: eager 1 ms, grouped_mm 2 ms); table in {measuring}" in display.lines
    assert "experts via eager" in trainer.program.source and trainer.program.manifest["kernel_choice"]["layers"][0]["kernel"] == "eager"


def test_build_refuses_an_unknown_device_and_says_when_it_did_not_measure(tmp_path):
    runner = CliRunner()
    refused = runner.invoke(app, ["build", "specs/token_routed_tiny.yaml", "-o", str(tmp_path / "a"), "--device", "tpu"])
    assert refused.exit_code == 2 and "unknown device 'tpu'; use cpu or cuda" in refused.output
    fixed = runner.invoke(app, ["build", "specs/token_routed_tiny.yaml", "-o", str(tmp_path / "b"), "--device", "cpu"])  # conftest: fixed
    assert fixed.exit_code == 0, fixed.output
    assert fixed.stdout.splitlines()[0] == "kernels.moe auto -> fixed rule, not measured (MOEC_KERNEL_CHOICE=fixed in the environment)"
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["kernel_choice"]["note"].startswith("MOEC_KERNEL_CHOICE")
