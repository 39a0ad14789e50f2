"""Annealed capacity factor, router temperature and noise std: the schedule's values, the
reference against the generated program at several steps, the effect, and no recompile."""

import math

import pytest
import torch
from torch._dynamo.utils import counters

import moec
from moec.backends.init import init_parameter
from moec.compile import build_model
from moec.moe.anneal import ANNEAL, Schedule
from moec.train.annealing import anneal_buffers, set_annealed
from moec.train.trainer import Trainer
from tests.backends.test_torch_differential import rel_error
from tests.moe.test_seed_options import fixture, moe_spec

ANNEALED = {
    "temperature_cosine": "          router: {temperature: {start: 1.5, end: 0.5, steps: 10, kind: cosine}}\n",
    "noise_std": "          router: {noise: {kind: gumbel, std: {start: 0.3, end: 0.0, steps: 10}}}\n",
    "capacity_factor": "          capacity: {mode: capacity, factor: {start: 2.0, end: 0.5, steps: 10}, drop_policy: renormalize}\n",
    "sinkhorn_temperature_capacity_bmm": "          router: {kind: sinkhorn, temperature: {start: 1.5, end: 1.0, steps: 10}}\n"
                                         "          capacity: {mode: capacity, factor: {start: 2.0, end: 0.75, steps: 10}}\n"
                                         "          aux: {load_balance: 0.01, z_loss: 0.01}\n",
}


def test_schedules_by_hand():
    linear, cosine = Schedule(2.0, 1.25, 4), Schedule(1.5, 1.0, 4, "cosine")
    assert [linear.at(s) for s in (0, 1, 2, 4, 9)] == [2.0, 1.8125, 1.625, 1.25, 1.25]
    assert cosine.at(0) == 1.5 and cosine.at(2) == pytest.approx(1.25) and cosine.at(1) == pytest.approx(1.5 - 0.5 * (1 - math.cos(math.pi / 4)) / 2)
    assert cosine.at(4) == cosine.at(100) == 1.0 and linear.peak == 2.0


@pytest.mark.parametrize("variant", list(ANNEALED))
def test_annealed_layer_agrees_with_the_reference_at_every_step(variant):
    spec = moe_spec(ANNEALED[variant], variant)
    program = moec.compile_spec(spec)
    model, ref = build_model(spec, program=program).eval(), moec.reference_model(spec).eval()
    state = {node.attr["name"]: init_parameter(node, 0) for node in program.graph.params()}
    outputs = []
    for step in (0, 4, 10):
        model.load_state_dict(state), ref.load_state_dict(state)
        for m in (model, ref):
            set_annealed(anneal_buffers(m, program), step)
        inputs = ref.example_inputs(batch=2, seq=16)
        a, b = model(*inputs), ref(*inputs)
        assert rel_error(a.output, b.output) < 1e-5 and a.aux_loss.item() == pytest.approx(b.aux_loss.item(), rel=1e-5, abs=1e-7)
        model.zero_grad(), ref.zero_grad()
        (a.output.exp().mean() + a.aux_loss).backward(), (b.output.exp().mean() + b.aux_loss).backward()
        grads = dict(model.named_parameters())
        for name, p in ref.named_parameters():
            assert rel_error(grads[name].grad, p.grad) < 1e-5, (step, name)
        outputs.append(a.output.detach())
    if variant != "noise_std":  # noise acts in training only
        assert not torch.allclose(outputs[0], outputs[2])  # the setting moved, and with it the output


def test_an_annealed_capacity_drops_more_as_it_shrinks():
    spec = moe_spec(ANNEALED["capacity_factor"], "capacity")
    model = moec.build_model(spec).eval()
    inputs = model.example_inputs(batch=2, seq=16)
    found = anneal_buffers(model, moec.compile_spec(spec))
    dropped = []
    for step in (0, 5, 10):
        set_annealed(found, step)
        dropped.append(model(*inputs).moe_stats[0].dropped.item())
    # C = floor(f * 32 * 2 / 4): f 2.0 -> 32 (nothing dropped), 1.25 -> 20, 0.5 -> 8 of 32 tokens' 64 choices
    assert dropped[0] == 0.0 and dropped[0] < dropped[1] < dropped[2] and dropped[2] >= 1 - 4 * 8 / 64


def test_the_trainer_anneals_and_a_moving_value_does_not_recompile(tmp_path):
    spec = moec.load_spec(fixture("m_annealing"))
    trainer = Trainer(spec, run_dir=tmp_path)
    trainer.run()
    buffer = dict(trainer.model.named_buffers())[f"blocks.0.moe.{ANNEAL}"]
    assert buffer.tolist() == pytest.approx([1.0, 0.0, 1.25])  # step 3 of 3: every schedule at its end
    model = moec.build_model(spec).train()
    torch._dynamo.reset(), counters.clear()
    step = torch.compile(model, fullgraph=True, backend="aot_eager")
    found = anneal_buffers(model, trainer.program)
    for s in (0, 1, 2):
        set_annealed(found, s)
        step(*model.example_inputs(batch=2, seq=16, seed=s))
    assert not counters.get("recompiles") and counters["stats"]["unique_graphs"] == 1
