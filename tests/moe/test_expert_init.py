"""Expert initialisation schemes (the `m` library's): each weight's spread matches its formula,
per expert matrix, and the reference interpreter starts from the same weights."""

import math

import pytest
import torch

import moec
from tests.passes.helpers import spec_with

LAYERS = 2  # repeat 2: the depth that scaled schemes divide by


def experts_spec(init: str):
    layer = f"        - kind: moe\n          experts: 4\n          top_k: 2\n          expert: {{hidden: 64, activation: swiglu, init: {init}}}\n"
    return spec_with(layer, name=init, d_model=32, repeat=LAYERS)


# (expected std, uniform bound or None) for a matrix [fan_out, fan_in]
EXPECTED = {
    "xavier_uniform": lambda out, fan_in: (math.sqrt(6 / (fan_in + out)) / math.sqrt(3), math.sqrt(6 / (fan_in + out))),
    "xavier_normal": lambda out, fan_in: (math.sqrt(2 / (fan_in + out)), None),
    "scaled_xavier": lambda out, fan_in: (0.02 / math.sqrt(2 * LAYERS), None),
    "scaled_kaiming": lambda out, fan_in: (math.sqrt(2 / fan_in) / math.sqrt(2 * LAYERS), None),
}


@pytest.mark.parametrize("init", list(EXPECTED))
def test_expert_weights_follow_the_scheme(init):
    spec = experts_spec(init)
    built, ref = moec.build_model(spec).state_dict(), moec.reference_model(spec).state_dict()
    for name in ("w_gate_up", "w_down"):
        weight = built[f"blocks.1.moe.experts.{name}"]
        assert torch.equal(weight, ref[f"blocks.1.moe.experts.{name}"])
        std, bound = EXPECTED[init](*weight.shape[-2:])  # fans of one [out, in] matrix: gate and up each [H, D]
        assert weight.std().item() == pytest.approx(std, rel=0.03), name
        if bound is not None:
            assert weight.abs().max().item() <= bound and weight.abs().max().item() > 0.99 * bound
    assert built["blocks.0.moe.router.weight"].std().item() == pytest.approx(0.02, rel=0.1)  # the router keeps model.init


def test_default_normal_init_is_unchanged():
    weight = moec.build_model(experts_spec("normal")).state_dict()["blocks.0.moe.experts.w_down"]
    assert weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * LAYERS), rel=0.03)  # depth-scaled output projection
