"""The generated MoE against an outside implementation: HF transformers' Mixtral block.

The block is built locally from a config with random weights (nothing is downloaded).
"""

import pytest
import torch
from transformers.models.mixtral import modeling_mixtral as hf  # a dev dependency (pyproject's [dev])

from moec.backends.torch.loader import load_program
from moec.compile import compile_spec
from tests.passes.helpers import spec_with

LAYER = """        - kind: moe
          experts: 4
          top_k: 2
          expert: {hidden: 24, activation: swiglu}
          router: {kind: topk, normalize: true}
          aux: {load_balance: 0.02}
"""


def test_generated_moe_matches_hf_mixtral_sparse_moe_block():
    config = hf.MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                              hidden_act="silu", router_jitter_noise=0.0)
    torch.manual_seed(0)
    block = hf.MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.2)
    compiled = compile_spec(spec_with(LAYER, name="mixtral"))
    moe = load_program(compiled.source, support=compiled.support_source).MoE().eval()  # the generated MoE layer class
    gate_up = block.experts.gate_up_proj.detach().unflatten(1, (2, -1))  # HF: [E, 2I, D], gate first; moec [E, 2, I, D]
    moe.load_state_dict({"router.weight": block.gate.weight.detach(), "experts.w_gate_up": gate_up,
                         "experts.w_down": block.experts.down_proj.detach()})
    h = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, aux, _ = moe(h)
    with torch.no_grad():
        expected = block(h)
        logits = torch.nn.functional.linear(h.reshape(-1, 16), block.gate.weight)
        expected_aux = 0.02 * hf.load_balancing_loss_func((logits,), num_experts=4, top_k=2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert aux.item() == pytest.approx(expected_aux.item(), rel=1e-5)
