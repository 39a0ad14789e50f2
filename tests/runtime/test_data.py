"""Datasets: deterministic in (seed, split, index), split by file, next-step targets."""

import pytest
import torch

from moec.data.datasets import Signals, TextBytes, Trajectories, expand_globs, last_value_baseline


def test_text_batches_are_a_function_of_seed_split_and_index():
    data = TextBytes.from_files(seed=0, seq_len=16, pool_last=False, files=["stdlib:json/*.py"], val_fraction=0.3)
    a, b = data.batch("train", 5, 4), data.batch("train", 5, 4)
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, data.batch("train", 6, 4).inputs)
    assert torch.equal(a.targets[:, :-1], a.inputs[:, 1:])  # next byte at every position
    assert a.inputs.dtype == torch.int64 and int(a.inputs.max()) < 256
    assert not set(data.files["train"]) & set(data.files["val"]) and data.files["val"]
    again = TextBytes.from_files(seed=0, seq_len=16, pool_last=False, files=["stdlib:json/*.py"], val_fraction=0.3)
    assert again.files == data.files  # the split depends on file names only


def test_missing_text_files_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no files match"):
        TextBytes.from_files(seed=0, seq_len=8, pool_last=False, files=[str(tmp_path / "*.txt")], val_fraction=0.1)
    assert expand_globs(["stdlib:json/__init__.py"])[0].name == "__init__.py"


def test_signals_and_trajectories_have_next_step_targets():
    signals = Signals(seed=1, seq_len=20, pool_last=True, patterns=["sine", "harmonics", "spiral"], noise=0.0)
    batch = signals.batch("val", 0, 6)
    assert batch.inputs.shape == (6, 20, 1) and batch.targets.shape == (6, 1, 1)
    trajectories = Trajectories(seed=1, seq_len=20, pool_last=False, patterns=["helix", "orbit", "lissajous", "lorenz"], noise=0.0)
    path = trajectories.batch("train", 3, 8)
    assert path.inputs.shape == (8, 20, 3) and torch.equal(path.targets[:, :-1], path.inputs[:, 1:])
    assert torch.isfinite(path.inputs).all() and path.inputs.abs().max() < 10


def test_the_last_value_baseline_is_what_it_says():
    signals = Signals(seed=2, seq_len=10, pool_last=False, patterns=["sine"], noise=0.0)
    batch = signals.batch("val", 0, 4)
    expected = torch.mean((batch.targets - batch.inputs) ** 2).item()
    assert last_value_baseline(signals, batches=1, size=4) == pytest.approx(expected)
    assert expected > 0.01  # frequencies are high enough that repeating the last value is a poor guess
