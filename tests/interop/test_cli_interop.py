"""``moec import hf`` / ``moec export hf`` on the command line, and training's ``--init-from``."""

import json

import pytest
import torch
import transformers as T
from typer.testing import CliRunner

import moec
from moec.cli.main import app
from moec.interop import load_weights

runner = CliRunner()
SMALL = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, max_position_embeddings=64)


def saved_mixtral(path):
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(T.MixtralConfig(**SMALL, num_local_experts=4)).save_pretrained(path)
    return path


def test_import_then_export_on_the_command_line(tmp_path):
    hf = saved_mixtral(tmp_path / "hf")
    result = runner.invoke(app, ["import", "hf", str(hf), "-o", str(tmp_path / "m.yaml")])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"wrote {tmp_path / 'm.yaml'} (mixtral)", f"wrote {tmp_path / 'm.safetensors'} (21 tensors)"]  # w_gate_up: one tensor per MoE layer where HF has gate and up
    assert runner.invoke(app, ["validate", str(tmp_path / "m.yaml")]).exit_code == 0
    result = runner.invoke(app, ["export", "hf", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


def test_unsupported_config_exits_1_naming_the_field(tmp_path):
    config = T.MixtralConfig(**SMALL).to_dict() | {"architectures": ["MixtralForCausalLM"], "router_jitter_noise": 0.1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["import", "hf", str(tmp_path), "-o", str(tmp_path / "m.yaml")])
    assert result.exit_code == 1
    assert "config field 'router_jitter_noise' = 0.1 is not supported" in result.stderr
    assert "Traceback" not in result.output


def test_export_refuses_what_no_family_holds(tmp_path):
    result = runner.invoke(app, ["export", "hf", "specs/token_routed_tiny.yaml", "--weights", "x.safetensors", "-o", str(tmp_path)])
    assert result.exit_code == 1
    assert "model.blocks" in result.stderr and "Traceback" not in result.output


def test_trainer_init_from_loads_the_imported_weights(tmp_path):
    from moec.train.trainer import Trainer

    hf = saved_mixtral(tmp_path / "hf")
    assert runner.invoke(app, ["import", "hf", str(hf), "-o", str(tmp_path / "m.yaml")]).exit_code == 0
    spec = moec.load_spec(tmp_path / "m.yaml")
    trainer = Trainer(spec, run_dir=tmp_path / "run", device="cpu", init_from=tmp_path / "m.safetensors")  # compiles lazily
    expected = moec.build_model(spec)
    load_weights(expected, tmp_path / "m.safetensors")
    for name, value in expected.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], value), name


@pytest.mark.parametrize("option, where", [("norm: rmsnorm", "router"), ("dropout: 0.1", "router")])
def test_export_refuses_the_m_library_router_options(tmp_path, option, where):
    hf = saved_mixtral(tmp_path / "hf")
    assert runner.invoke(app, ["import", "hf", str(hf), "-o", str(tmp_path / "m.yaml")]).exit_code == 0
    text = (tmp_path / "m.yaml").read_text()
    assert "router: {kind: topk, normalize: true}" in text
    (tmp_path / "m.yaml").write_text(text.replace("router: {kind: topk, normalize: true}", f"router: {{kind: topk, normalize: true, {option}}}"))
    result = runner.invoke(app, ["export", "hf", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "back")])
    assert result.exit_code == 1 and f".{where}: HF MoE routers have no input norm and no router dropout" in result.stderr
