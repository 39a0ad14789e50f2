"""``moec generate`` and ``moec eval`` on the tiny trained run; the rollout of a continuous model."""

import json

import torch
from typer.testing import CliRunner

import moec
from moec.cli.main import app
from moec.observe.metrics import read_metrics
from moec.serve.generate import Generator, plot_rollout, rollout
from moec.serve.sampling import Sampling

runner = CliRunner()


def test_eval_reproduces_the_runs_last_validation_loss_exactly(trained_run):
    run_dir, _ = trained_run
    out = runner.invoke(app, ["eval", str(run_dir), "--json"])
    assert out.exit_code == 0, out.output
    row = json.loads(out.stdout)
    last = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"][-1]
    assert row["step"] == last["step"] == 8
    assert row["val_loss"] == last["val_loss"] == row["run_val_loss"]
    assert row["val_bits_per_byte"] == last["val_bits_per_byte"]
    table = runner.invoke(app, ["eval", str(run_dir), "--data", "stdlib:json/decoder.py", "--batches", "1"])
    assert table.exit_code == 0 and "val_bits_per_byte" in table.stdout


def test_generate_streams_the_greedy_continuation(trained_run):
    run_dir, _ = trained_run
    args = ["generate", str(run_dir), "--prompt", "import json\n", "--max-new-tokens", "24", "--temperature", "0", "--no-compile"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    model, spec = moec.load_trained(run_dir)
    expected = bytes(Generator(model, spec, compile=False).stream(list(b"import json\n"), 24, Sampling(temperature=0)))
    assert first.stdout == second.stdout == expected.decode("utf-8", errors="replace") + "\n"


def test_generate_errors_are_one_line(trained_run, tmp_path):
    run_dir, _ = trained_run
    missing = runner.invoke(app, ["generate", str(tmp_path / "nope"), "--prompt", "x"])
    assert missing.exit_code == 1 and missing.stderr.strip() == f"error: {tmp_path / 'nope'}: no such run or checkpoint directory"
    long = runner.invoke(app, ["generate", str(run_dir), "--prompt", "x" * 65, "--no-compile"])
    assert long.exit_code == 1 and "the prompt has 65 tokens; the model's window (model.max_seq_len) is 64" in long.stderr
    both = runner.invoke(app, ["generate", str(run_dir)])
    assert both.exit_code == 2 and "exactly one of --prompt and --prompt-file" in both.output


def test_a_continuous_rollout_feeds_predictions_back_and_plots(tmp_path):
    spec = moec.load_spec("specs/signals_sinkhorn.yaml")
    model = moec.build_model(spec).eval()
    result = rollout(model, spec, steps=8, context=24)
    assert result.context.shape == (24, 1) and result.truth.shape == result.prediction.shape == (8, 1)
    with torch.no_grad():  # the second rolled-out value is the model's prediction after seeing its own first one
        seen = torch.cat([result.context, result.prediction[:1]])[None]
        assert torch.allclose(model(seen).output[0, -1], result.prediction[1], atol=1e-6)
    assert result.mse == torch.mean((result.prediction - result.truth) ** 2).item()
    plot_rollout(result, tmp_path / "rollout.png", spec.name)
    assert (tmp_path / "rollout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
