"""torch.compile(fullgraph=True) of every CPU-sized spec: forward + backward, no recompiles, same numbers.

Each spec is compiled once (module-scoped fixture): a cold compile takes tens of seconds here.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import moec

CPU_SPECS = ["gpt_oss_tiny", "moe_basics_tiny", "signals_sinkhorn", "token_routed_tiny", "spectral_moe"]


@pytest.fixture(scope="module", params=CPU_SPECS)
def compiled(request):
    torch._dynamo.reset()
    counters.clear()
    spec = moec.load_spec(f"specs/{request.param}.yaml")
    model = moec.build_model(spec).train()
    runs = []
    step = torch.compile(model, fullgraph=True)
    for seed in range(3):  # three different inputs of one shape
        inputs = model.example_inputs(batch=2, seq=32, seed=seed)
        out = step(*inputs)
        loss = out.output.exp().mean() + out.aux_loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        runs.append((inputs, out.output.detach(), out.aux_loss.detach(), grads))
    return spec, model, runs, dict(counters["stats"]), dict(counters.get("recompiles", {}))


@pytest.mark.slow
def test_compiles_once_with_no_graph_break_and_no_recompile(compiled):
    spec, model, runs, stats, recompiles = compiled
    assert stats.get("unique_graphs") == 1, stats
    assert not recompiles


@pytest.mark.slow
def test_compiled_forward_and_backward_agree_with_eager(compiled):
    spec, model, runs, stats, recompiles = compiled
    # Noise (signals_sinkhorn's gumbel router) is drawn differently when compiled: compare in eval.
    for inputs, output, aux, grads in runs[:1]:
        if spec.name == "signals_sinkhorn":
            continue
        eager = model(*inputs)
        torch.testing.assert_close(output, eager.output.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(aux, eager.aux_loss.detach(), rtol=1e-4, atol=1e-6)
        (eager.output.exp().mean() + eager.aux_loss).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-3, atol=1e-6, msg=name)
        model.zero_grad(set_to_none=True)
