"""What a new user hits first: one-line device errors, every section's errors at once, stable manifest
figures, timestamps in metrics, compile time kept out of tokens/s."""

import io
import json
from types import SimpleNamespace

import pytest
from rich.console import Console

import moec
from moec.observe.display import Display
from moec.observe.metrics import steady_tokens_per_s
from moec.train.trainer import RunResult
from tests.hostile.helpers import moec_cli, write_spec
from tests.runtime.helpers import quick_spec, quick_text


def test_an_unknown_device_is_one_line(tmp_path):
    result = moec_cli("train", write_spec(tmp_path), "--run-dir", tmp_path / "run", "--device", "mps", "--no-plots")
    assert (result.exit_code, result.stderr) == (1, "error: unknown --device 'mps'; use cpu or cuda\n")
    assert not (tmp_path / "run").exists()


def test_errors_of_every_section_are_reported_in_one_pass():
    text = quick_text().replace("max_seq_len: 64", "max_seq_len: 16").replace("experts: 4", "experts: 0")
    text = text.replace("  batch: 8\n", "  batch: 8\n  grad_accum: 3\n")
    with pytest.raises(moec.SpecError) as caught:
        moec.load_spec_text(text, file="q.yaml")
    assert [str(issue) for issue in caught.value.issues] == [
        "q.yaml:13:20: model.blocks[0].layers[1].experts: must be >= 1, got 0",
        "q.yaml:25:15: train.grad_accum: must divide batch (8), got 3",  # once: not again as train.batch
        "q.yaml:26:12: train.seq_len: must be <= model.max_seq_len (16), got 32",  # was hidden by the model error
    ]


def test_a_value_that_failed_is_never_used_by_a_check():
    # seq_len fails its own type: the seq_len check must not run on it (nor on a default)
    text = quick_text().replace("max_seq_len: 64", "max_seq_len: 16").replace("seq_len: 32", "seq_len: long")
    with pytest.raises(moec.SpecError) as caught:
        moec.load_spec_text(text, file="q.yaml")
    assert [str(issue) for issue in caught.value.issues] == ["q.yaml:25:12: train.seq_len: must be an integer, got text 'long'"]


def test_manifest_figures_do_not_depend_on_disabled_passes():
    spec = quick_spec()
    fused, unfused = moec.compile_spec(spec), moec.compile_spec(spec, disable=("fuse_moe",))
    assert "moe" not in {node.op for node in unfused.graph.nodes}
    for key in ("parameters", "flops_per_token", "memory_per_device"):
        assert unfused.manifest[key] == fused.manifest[key], key
    assert fused.manifest["parameters"]["active_per_token"] < fused.manifest["parameters"]["total"]
    assert [p["skipped"] for p in unfused.manifest["passes"] if p["name"] == "fuse_moe"] == [True]


def test_metrics_rows_carry_wall_time_and_elapsed_seconds_across_a_resume(tmp_path):
    spec_path, run = write_spec(tmp_path, steps=4, every=2), tmp_path / "run"
    assert moec_cli("train", spec_path, "--run-dir", run, "--no-plots", "--stop-at", "2").exit_code == 0
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert moec_cli("train", spec_path, "--run-dir", run, "--no-plots", "--resume").exit_code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[:len(first)] == first  # kept as written
    assert all(list(row)[:4] == ["kind", "step", "time", "elapsed_s"] for row in rows)
    times, elapsed = [row["time"] for row in rows], [row["elapsed_s"] for row in rows]
    assert times == sorted(times) and elapsed == sorted(elapsed) and 1.7e9 < times[0]
    assert elapsed[len(first)] >= elapsed[len(first) - 1]  # the resumed run counts on from the kept rows


def test_tokens_per_s_leaves_out_the_compiling_step():
    result = RunResult(run_dir=None, step=5, seconds=32.0, first_step_s=30.0)
    assert steady_tokens_per_s(result, tokens_seen=5 * 100, tokens_per_step=100, compiled=True) == 200.0
    assert result.compile_s == 30.0
    eager = RunResult(run_dir=None, step=5, seconds=10.0, first_step_s=2.0)
    assert steady_tokens_per_s(eager, tokens_seen=500, tokens_per_step=100, compiled=False) == 50.0 and eager.compile_s is None


def test_the_progress_says_compiling_before_the_first_step():
    out = io.StringIO()
    display = Display(Console(file=out, width=60, log_time=False, log_path=False))

    spec = moec.load_spec_text(quick_text().replace("compile: {enabled: false}", "compile: {enabled: true}"), file="q.yaml")
    with display.progress(SimpleNamespace(spec=spec, train=spec.train, start_step=0)):  # what progress() reads of a Trainer
        pass
    assert "compiling: torch.compile runs in the first step" in out.getvalue()
    long = "x" * 150
    display.log(long)  # not a terminal: not cut at the console's width
    assert long in out.getvalue()


def test_off_a_terminal_the_summary_is_not_cut_at_80_columns(monkeypatch):
    from moec.observe.display import _console

    monkeypatch.delenv("COLUMNS", raising=False)
    assert _console().width == 240
    monkeypatch.setenv("COLUMNS", "100")
    assert _console().width == 100
