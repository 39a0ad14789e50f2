"""``moec build``: writes the IR and DOT, dumps every stage, honours --disable-pass."""

import re

from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def test_build_writes_ir_and_dot(tmp_path):
    result = runner.invoke(app, ["build", "specs/spectral_moe.yaml", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    ir = (tmp_path / "ir.txt").read_text()
    assert ir.startswith('graph "spectral_moe" (43 nodes):')
    assert len(re.findall(r"= spectral_moe\(", ir)) == 2
    dot = (tmp_path / "graph.dot").read_text()
    assert dot.startswith("digraph moec {") and dot.count('fillcolor="#ffe4b5"') == 2
    assert "2 fused MoE node(s)" in result.stdout


def test_dump_ir_prints_every_stage_with_its_changes(tmp_path):
    result = runner.invoke(app, ["build", "specs/token_routed_tiny.yaml", "-o", str(tmp_path), "--dump-ir"])
    assert result.exit_code == 0
    headers = re.findall(r"^=== after (\w+) \([\d.]+ ms, (\w+)\) added (\{.*\}) removed (\{.*\})$", result.stdout, re.MULTILINE)
    assert [h[0] for h in headers] == ["lower", "infer_shapes", "fuse_moe", "fuse_spectral", "annotate_sharding", "cse", "dce"]
    assert headers[2][1:3] == ("changed", "{moe: 2}")
    assert headers[3][1] == "unchanged"


def test_disable_pass(tmp_path):
    result = runner.invoke(app, ["build", "specs/token_routed_tiny.yaml", "-o", str(tmp_path), "--disable-pass", "fuse_moe"])
    assert result.exit_code == 0
    assert " = moe(" not in (tmp_path / "ir.txt").read_text() and "0 fused MoE node(s)" in result.stdout
    assert runner.invoke(app, ["build", "specs/token_routed_tiny.yaml", "--disable-pass", "fuse_all"]).exit_code == 2
    assert runner.invoke(app, ["build", "specs/token_routed_tiny.yaml", "--disable-pass", "infer_shapes"]).exit_code == 2


def test_build_of_a_bad_spec_exits_1_with_the_location(tmp_path):
    bad = "tests/schema/errors/top_k_over_experts.error.top-k-must-be-experts-8-got-12.yaml"
    result = runner.invoke(app, ["build", bad, "-o", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {bad}:14:18: model.blocks[0].layers[1].top_k:")
    assert not (tmp_path / "ir.txt").exists()
