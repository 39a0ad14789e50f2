"""The expert-choice router (Zhou et al. 2022) end to end: validate, build, reference vs built,
the routing rule checked by hand, and a few training steps."""

import math

import pytest
import torch
import torch.nn.functional as F

import moec
from moec.backends.init import init_parameter
from moec.backends.torch.loader import load_program
from moec.compile import compile_spec
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.backends.test_torch_differential import assert_agree
from tests.passes.helpers import spec_with

LAYERS = """        - kind: attention
          heads: 2
        - kind: moe
          experts: 4
          top_k: 2
          router: {{kind: expert_choice}}
          expert: {{hidden: 8, activation: {activation}}}
{extra}"""


def ec_spec(activation="swiglu", extra="", kernel=None, name="ec"):
    spec = spec_with(LAYERS.format(activation=activation, extra=extra), name=name, tokens=False)
    if kernel is None:
        return spec
    text = spec.source.text.replace("train:\n", f"schedule:\n  kernels: {{moe: {kernel}}}\ntrain:\n")
    return moec.load_spec_text(text, file=f"{name}.yaml")


def test_resolves_to_capacity_routing_without_renormalisation_or_balance_loss():
    moe = ec_spec().model.blocks[0].layers[1]
    assert (moe.capacity.mode, moe.capacity.factor, moe.capacity.drop_policy) == ("capacity", 1.0, "zero")
    assert (moe.router.normalize, moe.aux.load_balance) == (False, 0.0)
    line = next(line for line in compile_spec(ec_spec()).source.splitlines() if line.startswith('    """expert_choice'))
    assert line == '    """expert_choice router, each expert picks from all 4, capacity 1.0 (zero), swiglu experts via bmm.'


@pytest.mark.parametrize("kernel, extra", [(None, ""), ("grouped_mm", "          capacity: {mode: capacity, factor: 0.5}\n"),
                                            ("eager", "          aux: {z_loss: 0.01}\n")])
def test_built_model_agrees_with_the_reference(kernel, extra):
    assert_agree(ec_spec(extra=extra, kernel=kernel), seeds=(0, 1), shapes=((2, 16), (1, 3)))


def _by_hand(x, router, w_up, w_down, capacity):
    """Each expert takes the `capacity` tokens with the highest softmax score; out = sum of score * FFN."""
    scores = torch.softmax(x @ router.T, -1)  # (N, E)
    out = torch.zeros_like(x)
    for e in range(router.shape[0]):
        chosen = torch.sort(scores[:, e], descending=True, stable=True).indices[:capacity]
        out[chosen] += scores[chosen, e, None] * (F.gelu(x[chosen] @ w_up[e].T) @ w_down[e].T)
    return out


def test_each_expert_takes_its_best_tokens():
    spec = spec_with(LAYERS.format(activation="gelu", extra="").replace("        - kind: attention\n          heads: 2\n", ""),
                     name="ec_rule", tokens=False)
    program = compile_spec(spec)
    module = load_program(program.source, support=program.support_source)
    moe = next(node for node in program.graph.nodes if node.op == "moe")
    params = {node.attr["name"]: init_parameter(node, 5) for node in program.graph.params()}
    h = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    names = [program.graph[ref.node].attr["name"] for ref in moe.inputs[2:]]
    layer = module.MoE().eval()  # the generated MoE layer class, with blocks.0.moe's parameters
    layer.load_state_dict({name.removeprefix("blocks.0.moe."): params[name] for name in names})
    out, aux, stats = layer(h)
    capacity = math.floor(1.0 * 12 * 2 / 4)  # factor * tokens * top_k / experts = 6 tokens per expert
    expected = _by_hand(h.reshape(12, 16), *(params[name] for name in names), capacity)
    torch.testing.assert_close(out.reshape(12, 16), expected, rtol=1e-5, atol=1e-6)
    assert stats.counts.tolist() == [12.0] * 4 and stats.dropped.item() == pytest.approx(0.5)  # 4 x 6 of 48 pairs kept
    assert aux.item() == 0.0


def test_a_few_training_steps_lower_the_loss(tmp_path):
    text = ec_spec().source.text.replace("train:\n", "schedule:\n  compile: {enabled: false}\n  deterministic: true\ntrain:\n")
    text = text.replace("  steps: 10\n", "  steps: 30\n  lr_schedule: {warmup_steps: 2}\n").replace("{lr: 1.0e-3}", "{lr: 1.0e-2}")
    result = Trainer(moec.load_spec_text(text, file="ec.yaml"), run_dir=tmp_path).run()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert result.step == 30 and all(math.isfinite(r["loss"]) for r in rows)
    assert sum(r["loss"] for r in rows[-5:]) < 0.7 * sum(r["loss"] for r in rows[:5])  # measured: 0.50 vs 0.87
    assert rows[-1]["moe"]["blocks.0.moe"]["utilization"] == [0.25] * 4  # balanced by construction
