"""The spectral seed's form: ``residual: false`` (z = mixture(z), no residual inside the spectral steps)."""

import math

import pytest

import moec
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.backends.test_torch_differential import assert_agree
from tests.passes.helpers import spec_with


def spectral_spec(residual: bool, depth: int, band: str = "embedding"):
    layer = f"""        - kind: spectral_moe
          depth: {depth}
          band: {band}
          residual: {str(residual).lower()}
          moe: {{experts: 4, top_k: 2, expert: {{hidden: 8, activation: gelu}}}}
"""
    return spec_with(layer, name=f"spectral_{residual}_{depth}", tokens=False)


@pytest.mark.parametrize("depth, band", [(1, "none"), (2, "embedding"), (3, "index_feature")])
def test_spectral_without_residual_fuses_and_agrees_with_the_reference(depth, band):
    spec = spectral_spec(False, depth, band)
    program = moec.compile_spec(spec)
    fused = [node for node in program.graph.nodes if node.op == "spectral_moe"]
    assert len(fused) == 1 and fused[0].attr["residual"] is False and fused[0].attr["depth"] == depth
    assert "        z = y  # residual: false" in program.source
    assert_agree(spec, seeds=(0, 1), shapes=((2, 16),))


def test_the_residual_changes_the_output():
    with_res, without = (moec.build_model(spectral_spec(r, 2)).eval() for r in (True, False))
    without.load_state_dict(with_res.state_dict())
    inputs = with_res.example_inputs(batch=2, seq=16)
    assert (with_res(*inputs).output - without(*inputs).output).abs().max() > 1e-3
    assert "residual" not in dict(next(n for n in moec.compile_spec(spectral_spec(True, 2)).graph.nodes if n.op == "spectral_moe").attrs)


@pytest.mark.parametrize("residual", [True, False])
def test_both_forms_train(residual, tmp_path):
    spec = spectral_spec(residual, 2)
    spec = moec.load_spec_text(spec.source.text.replace("train:\n", "schedule:\n  compile: {enabled: false}\ntrain:\n"), file="s.yaml")
    Trainer(spec, run_dir=tmp_path).run()
    rows = [row for row in read_metrics(tmp_path / "metrics.jsonl") if row["kind"] == "train"]
    assert len(rows) == 10 and all(math.isfinite(row["loss"]) for row in rows)
    assert all(row["grad_norm"] > 0 for row in rows) and rows[-1]["task_loss"] != rows[0]["task_loss"]
