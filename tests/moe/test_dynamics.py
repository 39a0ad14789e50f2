"""The INL dynamics layer (issue 14, the complexity seed's ``h, velocity = dynamics(h, velocity)``):
the reference kernel against an outside implementation written as complexity-deep's INLDynamics
module, the initial alpha / beta / gate, the velocity carried from block to block, and the
generated program against the reference (outputs, aux loss, every gradient)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moec
from moec.backends.reference import dense
from tests.backends.test_torch_differential import assert_agree
from tests.passes.helpers import spec_with


class SeedDynamics(nn.Module):
    """complexity-deep's INLDynamics (without its later contextual mu_proj), as the issue quotes it."""

    def __init__(self, hidden_size: int, controller_hidden: int, dt: float, beta_max: float):
        super().__init__()
        self.hidden_size, self.dt, self.beta_max = hidden_size, dt, beta_max
        self.mu = nn.Parameter(torch.zeros(hidden_size))
        self.controller_in = nn.Linear(hidden_size * 2, controller_hidden)
        self.controller_out = nn.Linear(controller_hidden, hidden_size * 3)

    def forward(self, h, v=None):
        if v is None:
            v = torch.zeros_like(h)
        ctrl = self.controller_out(F.silu(self.controller_in(torch.cat([h, v], dim=-1))))
        alpha_raw, beta_raw, gate_raw = torch.split(ctrl, self.hidden_size, dim=-1)
        alpha, beta = torch.sigmoid(alpha_raw), torch.clamp(F.softplus(beta_raw), max=self.beta_max)
        gate = torch.sigmoid(gate_raw)
        v_next = torch.clamp(alpha * v - beta * (h - self.mu), min=-10.0, max=10.0)
        return h + self.dt * gate * v_next, v_next


DYNAMICS = "        - kind: dynamics\n          controller_hidden: 8\n"
MOE = "        - kind: moe\n          experts: 4\n          top_k: 2\n          expert: {hidden: 8, activation: swiglu}\n"


def dynamics_spec(name: str, dynamics: str = DYNAMICS, residual: str = "pre_norm", repeat: int = 2):
    text = spec_with("        - kind: attention\n          heads: 2\n" + MOE + dynamics, name=name, repeat=repeat).source.text
    return moec.load_spec_text(text.replace("      layers:\n", f"      residual: {residual}\n      layers:\n", 1), file=f"{name}.yaml")


def test_reference_matches_the_seeds_module():
    torch.manual_seed(0)
    seed = SeedDynamics(6, 5, dt=0.1, beta_max=2.0)
    with torch.no_grad():
        seed.mu.normal_(), seed.controller_out.weight.mul_(8.0)  # large controls: beta reaches its clamp, v its limit
    h, v = torch.randn(2, 3, 6) * 4, torch.randn(2, 3, 6) * 8
    params = [seed.mu, seed.controller_in.weight, seed.controller_in.bias, seed.controller_out.weight, seed.controller_out.bias]
    attrs = {"dt": 0.1, "beta_max": 2.0, "velocity_limit": 10.0}
    saturated = []
    for velocity in (v, None):
        expected = seed(h, velocity)
        got = dense.dynamics(None, attrs, h, *([velocity] if velocity is not None else []), *params)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        saturated.append((expected[1].abs() == 10.0).any().item())
    assert saturated[0] and not all((expected[1].abs() == 10.0).flatten())  # the clamp was exercised, not everywhere


def test_initial_controls_are_the_configured_ones():
    spec = dynamics_spec("init", DYNAMICS + "          init_alpha: 0.8\n          init_beta: 0.3\n")
    state = moec.reference_model(spec).state_dict()
    bias = state["blocks.0.dynamics.controller_out.bias"].view(3, 16)
    torch.testing.assert_close(torch.sigmoid(bias[0]), torch.full((16,), 0.8))
    torch.testing.assert_close(F.softplus(bias[1]), torch.full((16,), 0.3))
    torch.testing.assert_close(torch.sigmoid(bias[2]), torch.full((16,), 0.5))
    assert state["blocks.0.dynamics.controller_out.weight"].std().item() == pytest.approx(0.01, rel=0.2)
    assert torch.equal(state["blocks.1.dynamics.mu"], torch.zeros(16))


def test_velocity_is_carried_from_block_to_block():
    graph = moec.compile_spec(dynamics_spec("carry", repeat=3)).graph
    nodes = [node for node in graph.nodes if node.op == "dynamics"]
    assert len(nodes) == 3 and len(nodes[0].inputs) == 6  # the first starts from v = 0
    for before, after in zip(nodes, nodes[1:]):
        assert after.inputs[1].node == before.name and after.inputs[1].index == 1


@pytest.mark.parametrize("variant", ["pre_norm", "post_norm_saturating"])
def test_dynamics_agrees_with_the_reference(variant):
    residual = variant.split("_saturating")[0]
    dynamics = DYNAMICS + ("          velocity_limit: 0.05\n          beta_max: 0.5\n          dt: 0.5\n" if "saturating" in variant else "")
    assert_agree(dynamics_spec(variant, dynamics, residual), seeds=(0, 3), shapes=((2, 16), (1, 3)))


def test_manifest_counts_the_controller_flops():
    from moec.manifest import flops_per_token

    with_dynamics = dynamics_spec("flops")
    without = moec.load_spec_text(with_dynamics.source.text.replace(DYNAMICS, ""), file="plain.yaml")
    extra = flops_per_token(with_dynamics, moec.compile_spec(with_dynamics).graph) - flops_per_token(without, moec.compile_spec(without).graph)
    assert extra == 2 * 2 * (2 * 16 * 8 + 8 * 3 * 16)  # two blocks, D = 16, C = 8
