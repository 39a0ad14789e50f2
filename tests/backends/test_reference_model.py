"""The reference interpreter on whole models: fused == unfused, spectral MoE, weights, gradients."""

import pytest
import torch

import moec
from moec.backends.reference import fused as fused_kernels
from moec.backends.reference.interpreter import Context
from tests.conftest import SPEC_FILES
from tests.passes.helpers import SPECTRAL, spec_with

CPU_SPECS = [p for p in SPEC_FILES if moec.load_spec(p).mesh.world_size == 1 or p.stem == "spectral_moe"]


@pytest.fixture(scope="module", params=CPU_SPECS, ids=[p.stem for p in CPU_SPECS])
def models(request):
    spec = moec.load_spec(request.param)
    unfused, fused = moec.reference_model(spec), moec.reference_model(spec, fused=True)
    return spec, unfused, fused


def test_fused_graph_interprets_to_the_same_numbers(models):
    spec, unfused, fused = models
    fused.load_state_dict(unfused.state_dict())
    inputs = unfused.example_inputs(batch=2, seq=32, seed=1)
    for training in (False, True):
        unfused.train(training), fused.train(training)
        torch.manual_seed(7)
        a = unfused(*inputs)
        torch.manual_seed(7)
        b = fused(*inputs)
        assert torch.equal(a.output, b.output) and torch.equal(a.aux_loss, b.aux_loss)


def test_gradients_reach_every_parameter(models):
    spec, unfused, _ = models
    unfused.train(spec.model.head.kind == "lm" and spec.model.head.mtp is not None)  # MTP modules run in training only
    out = unfused(*unfused.example_inputs(batch=2, seq=32))
    (out.output.square().mean() + out.aux_loss + sum(logits.square().mean() for logits in out.mtp_logits)).backward()
    missing = [name for name, p in unfused.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    unfused.zero_grad(set_to_none=True)


def test_weights_come_from_the_seed_alone():
    spec = moec.load_spec("specs/token_routed_tiny.yaml")
    a, b = moec.reference_model(spec).state_dict(), moec.reference_model(spec, fused=True).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    other = moec.reference_model(spec_with("        - kind: mlp\n", seed=1)).state_dict()
    assert not torch.equal(other["embed.weight"], moec.reference_model(spec_with("        - kind: mlp\n", seed=0)).state_dict()["embed.weight"])
    assert a["blocks.0.moe.experts.w_gate_up"].shape == (4, 2, 128, 64)  # gate and up of each expert, HF's gate_up_proj
    # Output projections are scaled by depth: std 0.02 / sqrt(2 * 2 layers) = 0.01.
    assert a["blocks.1.moe.experts.w_down"].std().item() == pytest.approx(0.01, rel=0.05)


def test_state_dict_keys_are_stable_and_readable(snapshot):
    spec = moec.load_spec("specs/signals_sinkhorn.yaml")
    assert {k: list(v.shape) for k, v in moec.reference_model(spec).state_dict().items()} == snapshot


def test_one_expert_top_1_equals_a_dense_ffn():
    moe = moec.reference_model(spec_with("""        - kind: moe
          experts: 1
          top_k: 1
          expert: {hidden: 24, activation: swiglu}
          aux: {load_balance: 0.0}
""")).eval()
    mlp = moec.reference_model(spec_with("        - kind: mlp\n          hidden: 24\n          activation: swiglu\n")).eval()
    state = mlp.state_dict()
    experts = moe.state_dict()
    state["blocks.0.mlp.w_gate.weight"], state["blocks.0.mlp.w_up.weight"] = experts["blocks.0.moe.experts.w_gate_up"][0]
    state["blocks.0.mlp.w_down.weight"] = experts["blocks.0.moe.experts.w_down"][0]
    state["blocks.0.mlp_norm.weight"] = moe.state_dict()["blocks.0.moe_norm.weight"]
    mlp.load_state_dict(state)
    inputs = mlp.example_inputs(batch=2, seq=8)
    torch.testing.assert_close(moe(*inputs).output, mlp(*inputs).output, rtol=1e-6, atol=1e-6)


def test_spectral_moe_is_real_shape_preserving_and_shares_weights_over_depth():
    shallow = moec.reference_model(spec_with(SPECTRAL.replace("depth: 3", "depth: 1"), tokens=False), fused=True)
    deep = moec.reference_model(spec_with(SPECTRAL, tokens=False), fused=True)
    assert sum(p.numel() for p in shallow.parameters()) == sum(p.numel() for p in deep.parameters())
    node = next(n for n in deep.graph.nodes if n.op == "spectral_moe")
    params = dict(deep.named_parameters())
    x = torch.randn(3, 10, 16, requires_grad=True)
    slots = [x] + [params[ref.node] for ref in node.inputs[1:]]  # parameter nodes are named by their keys
    ctx = Context(training=False, device=x.device, symbols={"B": 3, "S": 10})
    y, aux = fused_kernels.spectral_moe(ctx, node.attr, *slots)
    assert y.shape == x.shape and y.dtype == torch.float32 and aux.shape == ()
    (y.square().sum() + aux).backward()
    assert x.grad is not None and all(p.grad is not None and p.grad.abs().sum() > 0 for p in slots[1:])


def test_spectral_moe_with_nothing_routed_is_the_identity():
    """rfft then irfft round-trips: with zero expert outputs the layer returns its input."""
    model = moec.reference_model(spec_with(SPECTRAL, tokens=False), fused=True)
    node = next(n for n in model.graph.nodes if n.op == "spectral_moe")
    params = dict(model.named_parameters())
    slots = [torch.zeros_like(params[ref.node]) if "w_down" in ref.node else params[ref.node] for ref in node.inputs[1:]]
    x = torch.randn(2, 9, 16)  # odd length: irfft needs n = S
    ctx = Context(training=False, device=x.device, symbols={"B": 2, "S": 9})
    y, _ = fused_kernels.spectral_moe(ctx, node.attr, x, *slots)
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
