"""``moec bench``: a smoke run on a tiny spec (JSON rows with sane numbers) and its errors."""

import json

from typer.testing import CliRunner

from cli.main import app

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
    assert "has no moe layer to benchmark" in result.output
