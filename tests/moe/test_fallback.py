"""capacity.fallback: dense: tokens every expert dropped go through a dense FFN (the `m` library's fallback)."""

import pytest
import torch

import moec
from moec.backends.reference import routing
from tests.backends.test_torch_differential import assert_agree
from tests.passes.helpers import spec_with


def fallback_spec(kernel: str, fallback: str = "fallback: dense, fallback_weight: 0.5", bias: bool = False):
    layer = ("        - kind: moe\n          experts: 4\n          top_k: 2\n"
             f"          expert: {{hidden: 8, activation: swiglu, bias: {str(bias).lower()}}}\n"
             f"          capacity: {{mode: capacity, factor: 0.25, {fallback}}}\n")
    text = spec_with(layer, name=f"fallback_{kernel}").source.text.replace("train:\n", f"schedule:\n  kernels: {{moe: {kernel}}}\ntrain:\n")
    return moec.load_spec_text(text, file=f"fallback_{kernel}.yaml")


@pytest.mark.parametrize("kernel, bias", [("bmm", True), ("grouped_mm", False), ("eager", False)])
def test_fallback_agrees_with_the_reference(kernel, bias):
    assert_agree(fallback_spec(kernel, bias=bias), seeds=(0, 3), shapes=((2, 16), (1, 3)))


def test_fallback_changes_exactly_the_fully_dropped_tokens():
    with_fallback = moec.build_model(fallback_spec("bmm")).eval()
    without = moec.build_model(fallback_spec("bmm", fallback="drop_policy: zero")).eval()
    state = with_fallback.state_dict()
    without.load_state_dict({k: v for k, v in state.items() if ".fallback." not in k})
    assert any(".fallback.w_up" in k for k in state)
    inputs = with_fallback.example_inputs(batch=2, seq=16)
    changed = (with_fallback(*inputs).output - without(*inputs).output).abs().amax(-1) > 0  # (B, S): one MoE, per-token head
    # C = floor(0.25 * 32 * 2 / 4) = 4 slots per expert: at most 16 of 32 tokens keep a choice
    assert 16 <= changed.sum().item() < changed.numel()


def test_fallback_add_by_hand():
    out, dense = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
    kept = torch.tensor([[[True, False], [False, False], [False, True]]])
    result = routing.fallback_add(None, {"weight": 0.5}, out, dense, kept)
    assert result.tolist() == [[[0.0, 0.0], [0.5, 0.5], [0.0, 0.0]]]
