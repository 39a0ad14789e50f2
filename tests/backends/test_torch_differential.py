"""The generated program against the reference interpreter: outputs, aux loss and every gradient."""

import pytest
import torch

import moec
from moec.backends.init import init_parameter
from moec.compile import build_model, compile_spec
from tests.passes.helpers import spec_with

CPU_SPECS = ["gpt_oss_tiny", "moe_basics_tiny", "signals_sinkhorn", "token_routed_tiny", "spectral_moe"]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_agree(spec, seeds=(0, 1, 2), shapes=((2, 32),), kernel_program=None):
    program = kernel_program or compile_spec(spec)
    model, ref = build_model(spec, program=program).eval(), moec.reference_model(spec).eval()
    for seed in seeds:
        with torch.no_grad():  # weights from this seed in both
            state = {node.attr["name"]: init_parameter(node, seed) for node in program.graph.params()}
            model.load_state_dict(state), ref.load_state_dict(state)
        for batch, seq in shapes:
            inputs = ref.example_inputs(batch=batch, seq=seq, seed=seed)
            a, b = model(*inputs), ref(*inputs)
            assert rel_error(a.output, b.output) < 1e-5
            assert a.aux_loss.item() == pytest.approx(b.aux_loss.item(), rel=1e-5, abs=1e-7)
            model.zero_grad(), ref.zero_grad()
            # exp keeps d(loss)/d(output) positive: no cancellation in the head's bias gradient.
            (a.output.exp().mean() + a.aux_loss).backward()
            (b.output.exp().mean() + b.aux_loss).backward()
            grads = dict(model.named_parameters())
            for name, p in ref.named_parameters():
                assert rel_error(grads[name].grad, p.grad) < 1e-5, name


@pytest.mark.parametrize("name", CPU_SPECS)
def test_bundled_specs_agree_with_the_reference(name):
    # (1, 2): 2 tokens for 4-16 experts, so most experts get no token at all.
    assert_agree(moec.load_spec(f"specs/{name}.yaml"), shapes=((2, 32), (1, 2)))


MOE_VARIANTS = {
    "capacity_overflow_bmm": """          capacity: {mode: capacity, factor: 0.5, drop_policy: zero}
""",
    "capacity_renormalize_grouped": """          capacity: {mode: capacity, factor: 0.75, drop_policy: renormalize}
""",
    "sigmoid_bias_shared_bias": """          router: {kind: sigmoid_bias, normalize: true}
          shared_experts: {count: 2, hidden: 8}
          expert: {hidden: 8, activation: gelu, bias: true}
""",
    "sinkhorn_dense_eager": """          router: {kind: sinkhorn, temperature: 0.8}
          aux: {load_balance: 0.01, z_loss: 0.01}
""",
}
KERNEL = {"capacity_overflow_bmm": "bmm", "capacity_renormalize_grouped": "grouped_mm", "sinkhorn_dense_eager": "eager"}


@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
def test_moe_variants_and_kernels_agree(variant):
    layers = "        - kind: attention\n          heads: 2\n        - kind: moe\n          experts: 4\n          top_k: 2\n" + MOE_VARIANTS[variant]
    if "expert:" not in MOE_VARIANTS[variant]:
        layers += "          expert: {hidden: 8, activation: swiglu}\n"
    spec = spec_with(layers, name=variant)
    kernel = KERNEL.get(variant, "auto")
    if kernel != "auto":
        text = spec.source.text.replace("train:\n", f"schedule:\n  kernels: {{moe: {kernel}}}\ntrain:\n")
        spec = moec.load_spec_text(text, file=f"{variant}.yaml")
    assert_agree(spec, seeds=(0, 3), shapes=((2, 16), (1, 3)))


@pytest.mark.parametrize("band, kernel", [("embedding", "dft"), ("index_feature", "fft"), ("none", "auto")])
def test_spectral_variants_agree(band, kernel):
    layers = f"""        - kind: spectral_moe
          depth: 2
          band: {band}
          fft_norm: {"ortho" if band != "none" else "backward"}
          moe: {{experts: 4, top_k: 2, expert: {{hidden: 8, activation: gelu}}}}
"""
    spec = spec_with(layers, name=f"spectral_{band}", tokens=False)
    text = spec.source.text.replace("train:\n", f"schedule:\n  kernels: {{spectral_moe: {kernel}}}\ntrain:\n")
    assert_agree(moec.load_spec_text(text, file="s.yaml"), seeds=(0,), shapes=((2, 16), (2, 9)))


def test_post_norm_layernorm_learned_positions_agree():
    text = spec_with("        - kind: mlp\n          activation: relu\n          bias: true\n").source.text
    text = text.replace("    - repeat: 1\n", "    - repeat: 2\n      residual: post_norm\n      norm: {kind: layernorm}\n")
    text = text.replace("  inputs:", "  position: learned\n  inputs:")
    assert_agree(moec.load_spec_text(text, file="post.yaml"), seeds=(0,))
