"""``moec import hf`` refuses what it cannot import faithfully, in one line, writing nothing;
``moec export hf`` and ``moec train --init-from`` refuse damaged weights the same way.

A tiny random Mixtral directory is written once by transformers from a config (nothing is
downloaded); each test damages a copy of it.
"""

import json
import os
import pickle
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hostile.helpers import moec_cli

SMALL = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, max_position_embeddings=64, num_local_experts=4)
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    import transformers as T

    path = tmp_path_factory.mktemp("hf") / "mixtral"
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(T.MixtralConfig(**SMALL)).save_pretrained(path)
    return path


@pytest.fixture
def hf(mixtral_dir, tmp_path):
    return shutil.copytree(mixtral_dir, tmp_path / "hf")


def edit_config(hf, **changes):
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(config | changes))


def edit_tensors(hf, change):
    state = load_file(hf / "model.safetensors")
    change(state)
    save_file(state, hf / "model.safetensors", metadata={"format": "pt"})


def header_bomb(path):
    """The 8-byte little-endian header length set to 2^62."""
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])


def refused(result, out):
    """Exit 1, exactly one line on stderr, nothing on stdout, no traceback, nothing written under ``out``."""
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert result.stdout == "" and "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    return result.stderr


def import_hf(hf, tmp_path):
    out = tmp_path / "out"
    return moec_cli("import", "hf", hf, "-o", out / "m.yaml"), out


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_weights_are_refused_never_unpickled(hf, tmp_path, monkeypatch):
    torch.save(load_file(hf / "model.safetensors"), hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    result, out = import_hf(hf, tmp_path)
    assert refused(result, out) == (
        f"error: {hf}/pytorch_model.bin: pickled weights are not read (unpickling can run code); convert them to "
        "safetensors first, e.g. with transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
        "safe_serialization=True)\n")


def test_a_malicious_pickle_runs_nothing(hf, tmp_path):
    marker = tmp_path / "pwned"
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    result, out = import_hf(hf, tmp_path)
    assert "pickled weights are not read" in refused(result, out)
    assert not marker.exists()


def test_a_header_length_of_2_to_the_62_names_the_file_as_damaged(hf, tmp_path):
    header_bomb(hf / "model.safetensors")
    result, out = import_hf(hf, tmp_path)
    assert refused(result, out) == (f"error: {hf}/model.safetensors: not a readable safetensors file, damaged or not "
                                    "safetensors (header too large)\n")


def test_a_vocab_size_the_embedding_disagrees_with_names_both_shapes(hf, tmp_path):
    edit_config(hf, vocab_size=10**12)
    result, out = import_hf(hf, tmp_path)
    assert refused(result, out) == (f"error: {hf}/model.safetensors: tensor model.embed_tokens.weight has shape [64, 16], "
                                    "but config.json implies [1000000000000, 16] (vocab_size, hidden_size)\n")


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(hf, tmp_path):
    edit_tensors(hf, lambda state: state.__setitem__(Q_PROJ, torch.zeros(3, 3)))
    result, out = import_hf(hf, tmp_path)
    assert refused(result, out) == (f"error: {hf}/model.safetensors: tensor {Q_PROJ} has shape [3, 3], but config.json "
                                    "implies [16, 16]\n")


def test_zero_experts_is_a_config_error(hf, tmp_path):
    edit_config(hf, num_local_experts=0)
    result, out = import_hf(hf, tmp_path)
    assert refused(result, out) == (f"error: {hf}: config field 'num_local_experts' = 0 is not supported: an MoE layer needs at "
                                    "least one expert, and routes to at least one\n")


def test_non_finite_tensors_are_imported_with_one_warning_line(hf, tmp_path):
    def poison(state):
        state[Q_PROJ][0, 0] = float("nan")
        state["model.norm.weight"][1] = float("inf")
    edit_tensors(hf, poison)
    result, out = import_hf(hf, tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stderr == ("warning: 2 tensor(s) hold NaN or inf values, imported as they are: "
                             f"{Q_PROJ}, model.norm.weight\n")
    assert torch.isnan(load_file(out / "m.safetensors")["blocks.1.attention.wq.weight"][0, 0])


def test_a_refusal_while_converting_removes_the_shards_already_written(hf, tmp_path):
    from moec.interop import import_hf as run

    edit_tensors(hf, lambda state: state.__setitem__("model.zz_extra.weight", torch.zeros(2)))  # the last name read
    with pytest.raises(KeyError, match="'model.zz_extra.weight' has no place in the moec model"):
        run(hf, tmp_path / "out" / "m.yaml", shard_bytes=1024)  # a shard per few tensors: several written before
    assert list((tmp_path / "out").iterdir()) == []


@pytest.fixture
def imported(hf, tmp_path):
    result, _ = import_hf(hf, tmp_path)
    assert result.exit_code == 0, result.output
    return tmp_path / "out" / "m.yaml"


def test_export_of_a_spec_with_damaged_weights_is_one_line(imported, tmp_path):
    header_bomb(imported.with_suffix(".safetensors"))
    back = tmp_path / "back"
    result = moec_cli("export", "hf", imported, "-o", back)
    assert refused(result, back) == (f"error: {imported.with_suffix('.safetensors')}: not a readable safetensors "
                                     "file, damaged or not safetensors (header too large)\n")


@pytest.fixture
def damaged_checkpoint(finished_run, tmp_path):
    """The finished run's last checkpoint with one bit flipped in its shard."""
    ck = shutil.copytree(finished_run[1] / "checkpoints" / "step_00000004", tmp_path / "step_00000004")
    data = bytearray((ck / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 1
    (ck / "__0_0.distcp").write_bytes(bytes(data))
    return ck


def test_export_of_a_damaged_checkpoint_directory_is_one_line(damaged_checkpoint, tmp_path):
    ck, back = damaged_checkpoint, tmp_path / "back"
    result = moec_cli("export", "hf", ck, "-o", back)
    assert refused(result, back) == f"error: {ck}/__0_0.distcp: sha256 does not match manifest.json (damaged or replaced)\n"


def test_train_init_from_a_damaged_checkpoint_directory_is_one_line(finished_run, damaged_checkpoint, tmp_path):
    ck, run = damaged_checkpoint, tmp_path / "run"
    result = moec_cli("train", finished_run[0], "--init-from", ck, "--run-dir", run, "--no-plots")
    assert refused(result, run) == (f"error: --init-from: {ck}/__0_0.distcp: sha256 does not match manifest.json "
                                    "(damaged or replaced)\n")


def test_train_init_from_a_header_bomb_is_one_line(imported, tmp_path):
    weights = imported.with_suffix(".safetensors")
    header_bomb(weights)
    run = tmp_path / "run"
    result = moec_cli("train", imported, "--init-from", weights, "--run-dir", run, "--no-plots")
    assert refused(result, run) == (f"error: --init-from: {weights}: not a readable safetensors file, damaged or not "
                                    "safetensors (header too large)\n")
