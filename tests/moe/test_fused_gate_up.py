"""Gated experts hold gate and up in one weight, ``experts.w_gate_up`` [E, 2, H, D] (HF's gate_up_proj as a view), and
run one GEMM for both halves: the generated program against the split form (two GEMMs), forward and backward."""

import re

import pytest
import torch
import torch.nn.functional as F

import moec
from moec.backends.init import init_parameter
from moec.backends.torch import snippets
from moec.compile import build_model, compile_spec
from tests.passes.helpers import spec_with

GATED = {
    "swiglu": "{hidden: 8, activation: swiglu}",
    "geglu": "{hidden: 8, activation: geglu}",
    "reglu": "{hidden: 8, activation: reglu}",
    "clamped_swiglu_bias": "{hidden: 8, activation: clamped_swiglu, bias: true, swiglu_limit: 0.5}",
}
KERNELS = {"grouped_mm": ("grouped_linear(", ""), "eager": ("torch.bmm(", ""),
           "bmm": ("torch.bmm(", "          capacity: {mode: capacity, factor: 1.0}\n")}


def gated_spec(expert: str, kernel: str):
    capacity = KERNELS[kernel][1]
    spec = spec_with(f"        - kind: moe\n          experts: 4\n          top_k: 2\n          expert: {expert}\n{capacity}")
    text = spec.source.text.replace("train:\n", f"schedule:\n  kernels: {{moe: {kernel}}}\ntrain:\n")
    return moec.load_spec_text(text, file="gated.yaml")


def moe_class(source: str) -> str:
    """The generated MoE layer class (its forward is the fused MoE function)."""
    start = source.index("class MoE(")
    return source[start:source.index("\nclass ", start + 1)]


def split_moe(x, state, prefix, activation, top_k, clamp):
    """The layer with gate and up as two weights and two products per expert (the layout before w_gate_up)."""
    w_gate, w_up = state[prefix + "w_gate_up"].unbind(1)
    biases = state.get(prefix + "b_gate_up")
    b_gate, b_up = biases.unbind(1) if biases is not None else (None, None)
    w_down, b_down = state[prefix + "w_down"], state.get(prefix + "b_down")
    weights, chosen = torch.softmax(F.linear(x, state["router.weight"]), -1).topk(top_k, -1)  # topk router, renormalised
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j, e in enumerate(chosen[n].tolist()):
            gate = F.linear(x[n], w_gate[e], None if b_gate is None else b_gate[e])
            up = F.linear(x[n], w_up[e], None if b_up is None else b_up[e])
            hidden = snippets.clamped_glu(gate, up, *clamp) if activation == "clamped_swiglu" else \
                getattr(F, {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}[activation])(gate) * up
            out[n] += weights[n, j] * F.linear(hidden, w_down[e], None if b_down is None else b_down[e])
    return out


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("expert", list(GATED))
def test_a_gated_expert_layer_has_one_gate_up_weight_and_one_gemm_for_both_halves(expert, kernel):
    spec = gated_spec(GATED[expert], kernel)
    program = compile_spec(spec)
    names = [node.attr["name"] for node in program.graph.params()]
    assert "blocks.0.moe.experts.w_gate_up" in names and not any(re.search(r"experts\.[wb]_(gate|up)$", n) for n in names)
    shapes = {node.attr["name"]: node.attr["shape"] for node in program.graph.params()}
    assert shapes["blocks.0.moe.experts.w_gate_up"] == (4, 2, 8, 16)  # [E, 2, H, D]: flatten(1, 2) is HF's [E, 2H, D]
    body = moe_class(program.source)
    gemm = KERNELS[kernel][0]
    assert body.count(gemm) == 2, body  # gate + up in one, then down
    assert "gate_up = " in body and ".chunk(2, dim=-1)" in body

    # The program (one GEMM) against the reference interpreter (two F.linear per expert): forward and gradients.
    model, ref = build_model(spec, program=program).eval(), moec.reference_model(spec).eval()
    with torch.no_grad():
        state = {node.attr["name"]: init_parameter(node, 0) for node in program.graph.params()}
        if "bias" in expert:  # nonzero biases, so a mixed-up half would show
            state = {k: v + 0.1 * torch.randn_like(v) if ".b_" in k else v for k, v in state.items()}
        model.load_state_dict(state), ref.load_state_dict(state)
    inputs = ref.example_inputs(batch=2, seq=16, seed=0)
    a, b = model(*inputs), ref(*inputs)
    torch.testing.assert_close(a.output, b.output, rtol=1e-6, atol=1e-6)
    (a.output.exp().mean() + a.aux_loss).backward()
    (b.output.exp().mean() + b.aux_loss).backward()
    grads = dict(model.named_parameters())
    for name, param in ref.named_parameters():
        scale = param.grad.abs().max().clamp_min(1e-30)
        assert ((grads[name].grad - param.grad).abs().max() / scale).item() < 1e-6, name


@pytest.mark.parametrize("expert", list(GATED))
def test_the_fused_layer_equals_the_split_form_by_hand(expert):
    """The generated MoE class on its own against a per-token loop with separate gate and up weights (1e-6)."""
    spec = gated_spec(GATED[expert], "grouped_mm")
    model = build_model(spec).eval()
    moe = model.blocks[0].moe  # the generated MoE class
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name.startswith("experts.b_"):  # nonzero biases, so a mixed-up half would show
                p.add_(0.1 * torch.randn_like(p))
    state = {name: p.detach() for name, p in moe.named_parameters()}
    x = torch.randn(1, 12, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = moe(x)[0].reshape(12, 16)
    clamp = (0.5, 1.702) if "clamped" in expert else (None, None)
    expected = split_moe(x.reshape(12, 16), state, "experts.", expert.removesuffix("_bias"), 2, clamp)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_hf_gate_up_proj_is_w_gate_up_as_a_view_and_per_expert_halves_are_joined():
    from moec.interop.families.experts import MLP_EXPERTS
    from moec.interop.families.qwen3_moe import FAMILY
    from moec.interop.hf_weights import Converter, to_hf

    fused = torch.randn(2, 2 * 3, 5)  # transformers v5 in memory: [E, 2I, H], gate rows first
    ((name, expert, piece),) = MLP_EXPERTS.to_moec("mlp.experts.gate_up_proj", fused)
    assert (name, expert, piece.shape) == ("w_gate_up", None, (2, 2, 3, 5)) and piece.data_ptr() == fused.data_ptr()
    convert, got = Converter(FAMILY, [True], experts=2), {}
    for e in range(2):  # save_pretrained's per-expert tensors, in any order
        for proj, half in (("up_proj", 3), ("gate_proj", 0)):
            got.update(convert(f"model.layers.0.mlp.experts.{e}.{proj}.weight", fused[e, half:half + 3]))
    convert.finish()
    assert list(got) == ["blocks.0.moe.experts.w_gate_up"] and torch.equal(got["blocks.0.moe.experts.w_gate_up"], piece)
    back = dict(to_hf(FAMILY, [True], {"blocks.0.moe.experts.w_gate_up": piece}))
    assert torch.equal(back["model.layers.0.mlp.experts.1.gate_proj.weight"], fused[1, :3])
    assert torch.equal(back["model.layers.0.mlp.experts.1.up_proj.weight"], fused[1, 3:])
