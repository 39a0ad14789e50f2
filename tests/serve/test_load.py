"""moec.load_trained: a run or checkpoint directory -> the trained model, without touching DCP."""

import shutil

import pytest
import torch

import moec
from moec.checkpoint.dcp import CheckpointError, load_model_state
from moec.data.kinds import make_dataset


def test_the_loaded_model_has_the_trained_weights(trained_run):
    run_dir, _ = trained_run
    model, spec = moec.load_trained(run_dir)
    assert not model.training and model.checkpoint.step == 8 and spec.name == "quick"
    trained = moec.build_model(spec).eval()  # the same weights, read by the trainer's own loader
    load_model_state(run_dir / "checkpoints" / "step_00000008", trained)
    inputs = make_dataset(spec).batch("val", 0, 2).inputs
    with torch.no_grad():
        assert torch.equal(model(inputs).output, trained(inputs).output)
        assert not torch.equal(model(inputs).output, moec.build_model(spec)(inputs).output)  # not the seed's weights


def test_a_checkpoint_directory_and_a_damaged_newest_checkpoint(trained_run, tmp_path):
    run_dir, _ = trained_run
    model, _ = moec.load_trained(run_dir / "checkpoints" / "step_00000004")
    assert model.checkpoint.step == 4
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "step_00000008" / "meta.json").write_text("{}")
    assert moec.load_trained(copy)[0].checkpoint.step == 4  # the newest that verifies
    with pytest.raises(CheckpointError, match="no such run or checkpoint directory"):
        moec.load_trained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        moec.load_trained(tmp_path)
