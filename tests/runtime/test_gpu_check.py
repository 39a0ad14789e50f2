"""benchmarks/gpu_check.sh without a GPU: its CPU smoke mode runs every part at tiny shapes and writes the JSON rows
the GPU run writes (the layer table and the whole-model step), with the fields the GPU table is read from."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3-ep8-slice", "gpt-oss-20b")
PEERS = {"dense (limit)", "moec grouped_mm", "hf grouped_mm", "torchtitan-style", "dense fp8 (torchao rowwise)"}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the real shapes (minutes)")
def test_the_cpu_smoke_mode_writes_every_row(tmp_path):
    env = os.environ | {"PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    results_before = sorted((REPO / "benchmarks" / "results").iterdir())
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "CPU smoke mode" in (tmp_path / "gpu.txt").read_text()
    layers = json.loads((tmp_path / "layers_bf16.json").read_text())
    assert layers["dtype"] == "bfloat16"
    by_layer = {}
    for row in layers["rows"]:
        by_layer.setdefault(row["layer"], set()).add(row["name"])
        assert row["median_ms"] > 0 and row["tflops"] > 0 and row["of_dense"] > 0 and row["dense_tflops"] > 0
        assert row["vs_hf"] > 0 and row["vs_torchtitan"] > 0
        assert row["tflops"] == pytest.approx(row["of_dense"] * row["dense_tflops"])
    assert by_layer == {layer: PEERS for layer in LAYERS}
    model = json.loads((tmp_path / "model_step.json").read_text())
    assert [row["name"] for row in model["rows"]] == ["moec", "hf mixtral", "moec fp8"]
    for row in model["rows"]:
        assert row["tokens_per_s"] > 0 and row["ms_per_step"] > 0 and row["flops_per_token"] > 0
        assert row["parameters"] == model["rows"][0]["parameters"]  # the same model three times
    moec, hf = model["rows"][0]["first_loss"], model["rows"][1]["first_loss"]
    assert hf == pytest.approx(moec, rel=2e-3)  # HF runs moec's weights (bf16 parameters; measured 5e-5 apart)
    assert sorted((REPO / "benchmarks" / "results").iterdir()) == results_before  # the smoke run copies nothing there
