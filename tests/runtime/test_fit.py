"""The memory fit check refuses a run before anything is allocated."""

import resource

import pytest
import torch

import moec
from moec.compile import compile_spec
from moec.train.fit import check_fit, needed_bytes
from moec.train.trainer import Trainer, TrainingError
from tests.runtime.helpers import quick_spec, quick_text


def test_a_model_larger_than_memory_is_refused_in_one_line(tmp_path):
    text = quick_text().replace("d_model: 32", "d_model: 16384").replace("vocab: 256}", "vocab: 262144}")
    text = text.replace("hidden: 32,", "hidden: 65536,")
    spec = moec.load_spec_text(text, file="huge.yaml")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TrainingError) as caught:
        Trainer(spec, run_dir=tmp_path)
    message = str(caught.value)
    assert message.startswith("huge.yaml:3: the run needs about ") and " GiB per device (parameters, gradients and AdamW " in message
    assert "but cpu has " in message and message.endswith("make the model smaller, or shard it over more devices (mesh, sharding.fsdp)")
    state, _ = needed_bytes(spec, compile_spec(spec).manifest, 1)
    assert state == 16 * compile_spec(spec).manifest["parameters"]["total"]  # fp32 weights, grads and 2 AdamW moments
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2 * 2**20  # KiB: nothing near the model was allocated


def test_a_small_model_fits():
    spec = quick_spec()
    assert check_fit(spec, compile_spec(spec).manifest, torch.device("cpu"), 1) is None
