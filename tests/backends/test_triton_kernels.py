"""moec's Triton kernels under Triton's interpreter (TRITON_INTERPRET=1, CPU): the grouped GEMM
op against a per-row loop, and whole programs with ``kernels.moe: triton`` against the
reference interpreter (outputs, aux loss, every gradient), with empty experts, capacity drops
and top_k = 1."""

import pytest
import torch

import moec
from moec.backends.triton import grouped_linear
from tests.backends.test_torch_differential import MOE_VARIANTS, assert_agree
from tests.passes.helpers import spec_with


def per_row(x, w, experts_of_rows, source_rows):
    return torch.stack([x[s] @ w[e].T for s, e in zip(source_rows.tolist(), experts_of_rows.tolist())])


@pytest.mark.parametrize("top_k, kept", [(2, 20), (1, 10), (2, 13)], ids=["top2", "top1", "top2-drops"])
def test_grouped_gemm_forward_and_backward_match_a_loop(top_k, kept):
    torch.manual_seed(0)
    tokens, width, out, experts = 10, 40, 24, 4  # widths not multiples of the tiles: masked edges
    x = torch.randn(tokens, width, requires_grad=True)
    w = torch.randn(experts, out, width, requires_grad=True)
    expert_of_choice = torch.tensor([0, 0, 2, 2, 2, 0, 3, 3, 0, 2, 0, 0, 2, 3, 3, 2, 0, 0, 2, 2])[: tokens * top_k]  # 1: empty
    order = torch.argsort(expert_of_choice, stable=True)
    sorted_experts = expert_of_choice[order]
    dropped = torch.arange(tokens * top_k) >= kept  # the last rows as if capacity dropped them (sorted last)
    counts = torch.stack([((sorted_experts == e) & ~dropped).sum() for e in range(experts)])
    y = grouped_linear(x, w, counts.to(torch.int32), order, top_k)
    expected = per_row(x, w, sorted_experts, order // top_k) * (~dropped)[:, None]
    assert (y[dropped] == 0).all()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    got, want = torch.autograd.grad(y, (x, w), grad), torch.autograd.grad(expected, (x, w), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (got[1][1] == 0).all()  # the empty expert's weight gradient


TRITON_VARIANTS = {
    "dropless_top2": ("top_k: 2\n", "          expert: {hidden: 8, activation: swiglu}\n"),
    "dropless_top1": ("top_k: 1\n", "          expert: {hidden: 8, activation: swiglu}\n"),
    "capacity_drops": ("top_k: 2\n", MOE_VARIANTS["capacity_overflow_bmm"] + "          expert: {hidden: 8, activation: swiglu}\n"),
    "capacity_renormalize": ("top_k: 2\n", MOE_VARIANTS["capacity_renormalize_grouped"] + "          expert: {hidden: 8, activation: swiglu}\n"),
    "bias_gelu_sigmoid_router": ("top_k: 2\n", MOE_VARIANTS["sigmoid_bias_shared_bias"]),
    "softmax_relu_temperature": ("top_k: 2\n", "          router: {kind: topk, normalize: false, temperature: 0.7}\n"
                                 "          expert: {hidden: 8, activation: relu}\n"),
    "sigmoid_top1_geglu": ("top_k: 1\n", "          router: {kind: sigmoid_bias}\n          expert: {hidden: 8, activation: geglu}\n"),
    "capacity_top1_sigmoid_silu": ("top_k: 1\n", "          router: {kind: sigmoid_bias}\n" + MOE_VARIANTS["capacity_overflow_bmm"]
                                   + "          expert: {hidden: 8, activation: silu}\n"),
    "sinkhorn_torch_router": ("top_k: 2\n", MOE_VARIANTS["sinkhorn_dense_eager"] + "          expert: {hidden: 8, activation: swiglu}\n"),
    "clamped_swiglu_bias": ("top_k: 2\n", "          expert: {hidden: 8, activation: clamped_swiglu, bias: true, swiglu_limit: 0.5}\n"),
    "clamped_swiglu": ("top_k: 2\n", "          expert: {hidden: 8, activation: clamped_swiglu, swiglu_limit: 0.5}\n"),
}


@pytest.mark.parametrize("variant", list(TRITON_VARIANTS))
def test_programs_with_triton_kernels_agree_with_the_reference(variant):
    top_k, rest = TRITON_VARIANTS[variant]
    layers = f"        - kind: moe\n          experts: 4\n          {top_k}" + rest
    spec = spec_with(layers, name=variant)
    text = spec.source.text.replace("train:\n", "schedule:\n  kernels: {moe: triton}\n  tiles: {BM: 16, BN: 32, BK: 16}\ntrain:\n")
    spec = moec.load_spec_text(text, file=f"{variant}.yaml")
    program = moec.compile_spec(spec)
    assert ("triton_moe.route(logits, " in program.source) == ("sinkhorn" not in variant) and "argsort" not in program.source
    assert "triton_moe.permute(" in program.source and "triton_moe.combine(y_sorted, weights, dest" in program.source
    # the activation (and biases) in the GEMM's epilogue; a gated one reads w_gate_up [E, 2, H, D] in place
    gated = any(f"activation: {name}" in rest for name in ("swiglu", "geglu", "clamped_swiglu"))
    weight, bias = ("w_gate_up", "b_gate_up") if gated else ("w_up", "b_up")
    assert f"triton_moe.grouped_glu(x, self.experts.{weight}, group_sizes, order, " in program.source
    assert (f"bias=self.experts.{bias}" in program.source) == ("bias: true" in rest)
    assert "tiles=(16, 32, 16, 4, 3)" in program.source and ("block=16)" in program.source or "sinkhorn" in variant)  # BM: the router's tokens per program
    # (1, 3): three tokens over four experts, so at least one expert is empty
    assert_agree(spec, seeds=(0,), shapes=((2, 16), (1, 3)), kernel_program=program)


def test_grouped_gemm_in_bf16_matches_fp32_to_bf16_precision():
    torch.manual_seed(1)
    x, w = torch.randn(12, 32), torch.randn(3, 48, 32)
    counts = torch.tensor([5, 0, 7], dtype=torch.int32)
    expected = torch.cat([x[:5] @ w[0].T, x[5:] @ w[2].T])
    y = grouped_linear(x.bfloat16(), w.bfloat16(), counts)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - expected).norm() / expected.norm()).item() < 1e-2


def test_an_annealed_capacity_keeps_the_trimmed_rows_only():
    """Annealed capacity.factor 2.0 -> 0.5: the trim keeps fewer rows than the peak capacity; group sizes
    come from the permutation's totals (the kept rows), so the program agrees with the reference at each step."""
    from moec.backends.init import init_parameter
    from moec.compile import build_model
    from moec.train.annealing import anneal_buffers, set_annealed
    from tests.backends.test_torch_differential import rel_error
    from tests.moe.test_annealing import ANNEALED
    from tests.moe.test_seed_options import moe_spec

    text = moe_spec(ANNEALED["capacity_factor"], "annealed").source.text
    spec = moec.load_spec_text(text.replace("train:\n", "schedule:\n  kernels: {moe: triton}\ntrain:\n"), file="annealed.yaml")
    program = moec.compile_spec(spec)
    model, ref = build_model(spec, program=program).eval(), moec.reference_model(spec).eval()
    state = {node.attr["name"]: init_parameter(node, 0) for node in program.graph.params()}
    model.load_state_dict(state), ref.load_state_dict(state)
    for step in (0, 10):
        for m in (model, ref):
            set_annealed(anneal_buffers(m, program), step)
        inputs = ref.example_inputs(batch=2, seq=16)
        a, b = model(*inputs), ref(*inputs)
        assert rel_error(a.output, b.output) < 1e-5
        model.zero_grad(), ref.zero_grad()
        a.output.exp().mean().backward(), b.output.exp().mean().backward()
        grads = dict(model.named_parameters())
        for name, p in ref.named_parameters():
            assert rel_error(grads[name].grad, p.grad) < 1e-5, (step, name)
