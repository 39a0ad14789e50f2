"""``moec bench``: a smoke run on a tiny spec (JSON rows with sane numbers) and its errors."""

import json

import pytest
from typer.testing import CliRunner

from moec.cli.main import app

runner = CliRunner()


def test_bench_times_every_candidate_of_a_tiny_spec():
    result = runner.invoke(app, ["bench", "specs/token_routed_tiny.yaml", "model.blocks[0].layers[1].experts=8",  # an override
                                 "--tokens", "8", "--reps", "2", "--no-compile", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    # token_routed_tiny repeats one moe layer: one layer, four candidates
    assert [row["name"] for row in rows] == ["dense (limit)", "moec eager", "hf grouped_mm", "per-expert loop"]
    assert {row["layer"] for row in rows} == {"model.blocks[0].layers[1]"}
    assert all(row["tokens"] == 8 and 0 < row["low_ms"] <= row["median_ms"] <= row["high_ms"] for row in rows)
    by_name = {row["name"]: row for row in rows}
    assert by_name["dense (limit)"]["efficiency"] == 1.0 and by_name["hf grouped_mm"]["vs_hf"] == 1.0
    assert by_name["moec eager"]["efficiency"] > 0 and by_name["moec eager"]["vs_hf"] > 0
    assert "D=64 H=128 E=8 top-2" in by_name["moec eager"]["shape"]


def test_bench_refuses_a_spec_without_moe_layers(tmp_path):
    spec = open("specs/token_routed_tiny.yaml").read().replace("        - kind: moe\n          experts: 4\n          top_k: 2\n"
                                                                "          expert: {hidden: 128, activation: swiglu}\n"
                                                                "          aux: {load_balance: 0.01}\n", "")
    path = tmp_path / "dense.yaml"
    path.write_text(spec)
    result = runner.invoke(app, ["bench", str(path), "--no-compile"])
    assert result.exit_code == 1
    assert "has no moe or spectral_moe layer to benchmark" in result.output


def test_bench_times_spectral_layers_against_attention_and_the_dft_against_the_fft():
    result = runner.invoke(app, ["bench", "specs/spectral_moe_dp2_ep2.yaml", "--seq", "16", "--seq", "32", "--crossover-seq", "8",
                                 "--crossover-seq", "16", "--reps", "2", "--no-compile", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    # two identical spectral layers: one distinct layer
    assert [(r["table"], r["seq"], r["name"]) for r in rows] == [
        ("spectral_vs_attention", 16, "spectral_moe"), ("spectral_vs_attention", 16, "attention"),
        ("spectral_vs_attention", 32, "spectral_moe"), ("spectral_vs_attention", 32, "attention"),
        ("fft_vs_dft", 8, "spectral_moe dft"), ("fft_vs_dft", 8, "spectral_moe fft"),
        ("fft_vs_dft", 16, "spectral_moe dft"), ("fft_vs_dft", 16, "spectral_moe fft")]
    assert all(0 < r["low_ms"] <= r["median_ms"] <= r["high_ms"] and r["saved_mib"] > 0 for r in rows)
    saved = {(r["seq"], r["name"]): r["saved_mib"] for r in rows if r["table"] == "spectral_vs_attention"}
    assert saved[32, "attention"] > saved[16, "attention"]  # activations grow with the sequence


def test_bench_crossover_times_the_compiled_block_too():
    result = runner.invoke(app, ["bench", "specs/spectral_moe_dp2_ep2.yaml", "--seq", "16", "--crossover-seq", "8", "--reps", "1",
                                 "--json"])
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads(result.stdout) if r["table"] == "fft_vs_dft"]
    assert [r["name"] for r in rows] == ["spectral_moe dft", "spectral_moe fft", "spectral_moe dft compiled", "spectral_moe fft compiled"]
    assert all(r["seq"] == 8 and r["median_ms"] > 0 for r in rows)


def test_growth_exponent_and_crossover_from_rows():
    from moec.bench.spectral import SpectralRow, crossover_seq, growth_exponent

    def row(seq, name, ms):
        return SpectralRow("l", seq, name, ms, ms, ms, 1.0)
    assert growth_exponent([row(256, "a", 1.0), row(512, "a", 4.0), row(1024, "a", 16.0)], "a") == pytest.approx(2.0)
    times = {16: (1, 2), 32: (2, 1), 64: (3, 4), 128: (5, 3), 256: (9, 4)}  # (dft, fft) ms: the fft wins from 128 on
    rows = [r for seq, (d, f) in times.items() for r in (row(seq, "spectral_moe dft", d), row(seq, "spectral_moe fft", f))]
    assert crossover_seq(rows) == 128


def test_bench_startup_times_the_build_and_a_first_step_in_a_new_process():
    result = runner.invoke(app, ["bench", "specs/token_routed_tiny.yaml", "train.batch=2", "train.seq_len=16", "--tokens", "8",
                                 "--reps", "2", "--no-compile", "--startup", "--json"])
    assert result.exit_code == 0, result.output
    rows = [row for row in json.loads(result.stdout) if row["table"] == "startup"]
    assert [row["name"] for row in rows] == ["build (spec -> program)", "first step, eager"]
    assert all(0 < row["seconds"] < 120 for row in rows)
