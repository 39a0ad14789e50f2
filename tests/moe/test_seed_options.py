"""The seed models' MoE options (issue 14): each happy fixture validates against the JSON Schema,
builds, agrees with the reference interpreter and trains a few steps; each option's math is
checked against the reference to 1e-5 and its kernel against a hand computation."""

import math
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

import moec
from moec import json_schema
from moec.backends.reference import routing
from moec.backends.torch import snippets
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.backends.test_torch_differential import assert_agree
from tests.passes.helpers import spec_with

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("*.happy.yaml"))
MOE_LAYER = "        - kind: attention\n          heads: 2\n        - kind: moe\n          experts: 4\n          top_k: 2\n"


def moe_spec(options: str, name: str, expert: str = "{hidden: 8, activation: swiglu}", tokens: bool = True):
    return spec_with(MOE_LAYER + f"          expert: {expert}\n" + options, name=name, tokens=tokens)


@pytest.mark.parametrize("path", FIXTURES, ids=[p.name.split(".")[0] for p in FIXTURES])
def test_happy_fixture_validates_builds_agrees_and_trains(path, tmp_path):
    jsonschema.Draft202012Validator(json_schema()).validate(yaml.safe_load(path.read_text()))
    spec = moec.load_spec(path)
    assert_agree(spec, seeds=(0,), shapes=((2, 16),))
    Trainer(spec, run_dir=tmp_path).run()
    rows = [row for row in read_metrics(tmp_path / "metrics.jsonl") if row["kind"] == "train"]
    assert len(rows) == spec.train.steps and all(math.isfinite(row["loss"]) for row in rows)
    for name, layer in rows[-1]["moe"].items():  # the reward terms are logged per layer
        moe = next(lay if lay.kind == "moe" else lay.moe for _, _, lay in spec.model.layers() if lay.kind in ("moe", "spectral_moe"))
        if moe.aux.entropy or moe.aux.margin:
            assert (layer["aux_entropy"] < 0) == (moe.aux.entropy > 0) and (layer["aux_margin"] < 0) == (moe.aux.margin > 0), name


# Options that change the math, each against the reference interpreter (outputs, aux loss, gradients).
ROUTER_OPTIONS = {
    "norm_rmsnorm": "          router: {norm: rmsnorm}\n",
    "norm_layernorm_bias": "          router: {norm: layernorm, bias: true}\n",
    "sinkhorn_topk_capacity": "          router: {kind: sinkhorn, sinkhorn: {topk: 2}}\n"
                              "          capacity: {mode: capacity, factor: 1.0, drop_policy: renormalize}\n"
                              "          aux: {load_balance: 0.01, z_loss: 0.01}\n",
    "sinkhorn_topk3": "          router: {kind: sinkhorn, sinkhorn: {topk: 3}, normalize: false}\n"
                      "          aux: {load_balance: 0.01, z_loss: 0.01}\n",
    "entropy_margin": "          aux: {load_balance: 0.01, entropy: 0.1, margin: 0.05}\n",
    "margin_model_scope": "          aux: {margin: 0.05, load_balance_scope: model}\n",
    "dropout_eval": "          router: {dropout: 0.5}\n",
}


@pytest.mark.parametrize("option", list(ROUTER_OPTIONS))
def test_router_option_agrees_with_the_reference(option):
    assert_agree(moe_spec(ROUTER_OPTIONS[option], option), seeds=(0, 3), shapes=((2, 16), (1, 3)))


@pytest.mark.parametrize("kernel", ["grouped_mm", "bmm"])
def test_router_dropout_in_training_agrees_with_the_reference_from_one_seed(kernel):
    options = "          router: {dropout: 0.5}\n" + ("          capacity: {mode: capacity, factor: 1.0, drop_policy: zero}\n"
                                                     if kernel == "bmm" else "")
    spec = moe_spec(options, f"dropout_{kernel}")
    model, ref = moec.build_model(spec).train(), moec.reference_model(spec).train()
    inputs = ref.example_inputs(batch=2, seq=16)
    torch.manual_seed(7)
    a = model(*inputs)
    torch.manual_seed(7)
    b = ref(*inputs)
    torch.testing.assert_close(a.output, b.output, rtol=1e-5, atol=1e-6)
    torch.manual_seed(8)
    assert not torch.allclose(model(*inputs).output, a.output)  # another draw drops other tokens
    model.eval()
    assert not torch.allclose(model(*inputs).output, a.output)  # eval: no dropout


def test_router_dropout_zeroes_the_best_choice_of_p_of_the_tokens():
    weights = torch.rand(4000, 2) + 0.1
    torch.manual_seed(0)
    out = snippets.router_dropout(weights, 0.25, training=True)
    dropped = out[:, 0] == 0
    assert dropped.float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert torch.equal(out[:, 1], weights[:, 1]) and torch.equal(out[~dropped, 0], weights[~dropped, 0])
    assert torch.equal(snippets.router_dropout(weights, 0.25, training=False), weights)


def seed_sinkhorn(logits: torch.Tensor, iters: int, tau: float, topk: int) -> torch.Tensor:
    """The `m` library's form (seed: u = r / (K v), v = c / (K^T u)) in plain space, K zeroed outside each token's topk."""
    kernel = torch.exp(logits.double() / tau)
    keep = torch.zeros_like(kernel, dtype=torch.bool).scatter(1, torch.topk(logits, topk, dim=-1).indices, True)
    kernel = kernel * keep
    tokens, experts = kernel.shape
    u, v = torch.ones(tokens, dtype=torch.float64), torch.ones(experts, dtype=torch.float64)
    for _ in range(iters):
        u = 1.0 / (kernel @ v)
        v = torch.nan_to_num((tokens / experts) / (kernel.T @ u), posinf=0.0)  # no candidate: an empty column
    return u[:, None] * kernel * v[None, :]


@pytest.mark.parametrize("topk", [1, 2, 3])
def test_sinkhorn_topk_matches_the_seeds_formula(topk):
    torch.manual_seed(topk)
    logits = torch.randn(12, 6)
    scores = snippets.sinkhorn(logits, 5, 0.7, 1.0, topk=topk)
    torch.testing.assert_close(scores.double(), seed_sinkhorn(logits, 5, 0.7, topk), rtol=1e-5, atol=1e-6)
    outside = torch.ones_like(scores, dtype=torch.bool).scatter(1, torch.topk(logits, topk, dim=-1).indices, False)
    assert torch.all(scores[outside] == 0) and torch.all(scores[~outside] > 0)
    logits.requires_grad_(True)
    snippets.sinkhorn(logits, 5, 0.7, 1.0, topk=topk).sum().backward()
    assert torch.isfinite(logits.grad).all()  # an empty column gives no NaN gradient


def test_entropy_and_margin_rewards_by_hand():
    uniform, onehot = torch.full((1, 3, 4), 0.25), torch.tensor([[[0.97, 0.01, 0.01, 0.01]]])
    assert routing.entropy_loss(None, {"weight": 0.5}, uniform).item() == pytest.approx(-0.5 * math.log(4))
    assert routing.margin_loss(None, {"weight": 0.5}, uniform).item() == pytest.approx(0.0)
    assert routing.margin_loss(None, {"weight": 2.0}, onehot).item() == pytest.approx(-2.0 * 0.96)
    # the generated program's helpers compute the same numbers
    assert snippets.router_entropy(uniform.reshape(3, 4)).item() == pytest.approx(math.log(4))
    assert snippets.router_margin(onehot.reshape(1, 4)).item() == pytest.approx(0.96)


def fixture(name: str) -> Path:
    return next(path for path in FIXTURES if path.name.startswith(name + "."))


def test_router_options_are_in_the_ir_and_the_generated_code():
    spec = moec.load_spec(fixture("m_router_options"))
    program = moec.compile_spec(spec)
    assert "scores = sinkhorn(noisy, 5, 0.7, 1.0, 3)" in program.source
    assert "F.rms_norm(h.reshape(tokens, -1), (h.shape[-1],), self.router.norm.weight, 1e-05)" in program.source
    assert "weights = router_dropout(weights, 0.05, self.training)" in program.source
    assert "aux = balance + z + entropy_loss + margin_loss" in program.source
    moe = [node for node in program.graph.nodes if node.op == "moe"][0].attr["moe"]
    assert (moe.router.norm, moe.router.dropout, moe.router.sinkhorn_topk, moe.aux.entropy, moe.aux.margin) == ("rmsnorm", 0.05, 3, 0.01, 0.01)
    assert moec.build_model(spec).state_dict()["blocks.0.moe.router.norm.weight"].shape == (32,)
