"""Group-limited routing (router.groups / top_groups / scale) and the sequence-wise balance loss
(aux.load_balance_scope: sequence): the built program against the reference interpreter, the routing
against Hugging Face's DeepseekV3TopkRouter, the loss against DeepSeek-V3's formula written out."""

import pytest
import torch

import moec
from moec.backends.init import init_parameter
from moec.backends.reference import routing
from moec.backends.torch import snippets
from moec.compile import build_model, compile_spec
from tests.passes.helpers import spec_with


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def moe_spec(name: str, moe: str, experts: int = 8, top_k: int = 2, repeat: int = 2):
    layers = ("        - kind: attention\n          heads: 2\n        - kind: moe\n"
              f"          experts: {experts}\n          top_k: {top_k}\n          expert: {{hidden: 8, activation: swiglu}}\n" + moe)
    return spec_with(layers, name=name, repeat=repeat)


VARIANTS = {  # (the moe lines, experts, top_k)
    "sigmoid_bias_groups_scale": ("          router: {kind: sigmoid_bias, groups: 4, top_groups: 2, scale: 2.5}\n", 8, 2),
    "sigmoid_bias_groups_unnormalized": ("          router: {kind: sigmoid_bias, groups: 4, top_groups: 3, normalize: false, scale: 1.5}\n"
                                         "          shared_experts: {count: 1, hidden: 8}\n", 8, 3),
    "sigmoid_bias_one_group_scale": ("          router: {kind: sigmoid_bias, groups: 1, top_groups: 1, scale: 2.5}\n", 8, 2),
    "softmax_groups": ("          router: {kind: topk, groups: 2, top_groups: 1, normalize: false, scale: 3.0}\n", 8, 2),
    "softmax_groups_capacity": ("          router: {kind: topk, groups: 4, top_groups: 2}\n"
                                "          capacity: {mode: capacity, factor: 0.75, drop_policy: zero}\n", 8, 3),
    "sequence_balance": ("          aux: {load_balance: 0.1, load_balance_scope: sequence, z_loss: 0.01}\n", 8, 2),
    "sequence_balance_groups": ("          router: {kind: sigmoid_bias, groups: 4, top_groups: 2, scale: 2.5}\n"
                                "          aux: {load_balance: 0.1, load_balance_scope: sequence}\n", 8, 2),
}


def assert_agree(spec, seeds=(0, 1), shapes=((3, 16), (1, 3))) -> float:
    """Outputs, aux losses and every gradient within 1e-5, with a random selection bias (the trainer moves it); the worst
    relative error."""
    program = compile_spec(spec)
    model, ref = build_model(spec, program=program).eval(), moec.reference_model(spec).eval()
    worst = 0.0
    for seed in seeds:
        with torch.no_grad():
            state = {node.attr["name"]: init_parameter(node, seed) for node in program.graph.params()}
            generator = torch.Generator().manual_seed(seed)
            for name in state:
                if name.endswith("router.selection_bias"):
                    state[name] = 0.1 * torch.randn(state[name].shape, generator=generator)
            model.load_state_dict(state), ref.load_state_dict(state)
        for batch, seq in shapes:
            inputs = ref.example_inputs(batch=batch, seq=seq, seed=seed)
            a, b = model(*inputs), ref(*inputs)
            worst = max(worst, rel_error(a.output, b.output), rel_error(a.aux_loss, b.aux_loss))
            model.zero_grad(), ref.zero_grad()
            (a.output.exp().mean() + a.aux_loss).backward()
            (b.output.exp().mean() + b.aux_loss).backward()
            grads = dict(model.named_parameters())
            for name, p in ref.named_parameters():
                worst = max(worst, rel_error(grads[name].grad, p.grad))
    assert worst < 1e-5
    return worst


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_program_agrees_with_the_reference(variant):
    moe, experts, top_k = VARIANTS[variant]
    assert_agree(moe_spec(variant, moe, experts, top_k))


def test_spectral_moe_takes_both_too():
    """A spectral layer's sequences are its batch rows of frequency bins: the same ops, the same agreement."""
    layers = ("        - kind: spectral_moe\n          depth: 2\n          moe: {experts: 8, top_k: 2, expert: {hidden: 8, activation: gelu}, "
              "router: {kind: sigmoid_bias, groups: 4, top_groups: 2, scale: 2.0}, aux: {load_balance: 0.1, load_balance_scope: sequence}}\n")
    assert_agree(spec_with(layers, name="spectral_groups", tokens=False), seeds=(0,), shapes=((2, 16),))


def test_the_program_says_what_it_does():
    spec = moe_spec("words", VARIANTS["sequence_balance_groups"][0])
    text = compile_spec(spec).source
    assert "select_grouped_experts(scores, 2, 4, 2, self.router.selection_bias)" in text
    assert "weights = weights * 2.5  # router.scale, after renormalisation" in text
    assert "0.1 * sequence_load_balance_loss(scores, chosen, batch, 8)" in text


def test_triton_keeps_a_group_limited_router_in_torch_lines():
    """kernels.moe: triton fuses a plain top-k router only; with groups the torch selection feeds the Triton experts."""
    from moec.backends.torch.codegen_moe import moe_function
    from moec.moe import moe_attrs, moe_slots

    for moe, fused in ((VARIANTS["sigmoid_bias_groups_scale"][0], False), (VARIANTS["sigmoid_bias_one_group_scale"][0], True)):
        attrs = moe_attrs(moe_spec("triton", moe).model.blocks[0].layers[1])
        text = "\n".join(moe_function("moe", ("h", "router_in", *moe_slots(attrs)), attrs, "triton", tiles=(16, 16, 16, 16)))
        assert ("triton_moe.route(" in text) == fused
        assert ("select_grouped_experts(" in text) == (not fused)
        assert "weights = weights * 2.5  # router.scale, after renormalisation" in text


# --- routing against Hugging Face (DeepseekV3TopkRouter) ---------------------------------


def _hf_router(experts, groups, top_groups, top_k, normalize, scale, seed):
    config = pytest.importorskip("transformers").DeepseekV3Config(
        hidden_size=16, n_routed_experts=experts, n_group=groups, topk_group=top_groups, num_experts_per_tok=top_k,
        norm_topk_prob=normalize, routed_scaling_factor=scale)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    router = DeepseekV3TopkRouter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator))
        router.e_score_correction_bias.copy_(0.3 * torch.randn(experts, generator=generator))
    return router


def _sorted_by_expert(weights, chosen):
    order = chosen.argsort(-1)
    return weights.gather(-1, order), chosen.gather(-1, order)


@pytest.mark.parametrize("groups, top_groups, top_k, normalize, scale", [
    (4, 2, 4, True, 2.5), (8, 3, 6, False, 1.0), (1, 1, 4, True, 1.0), (2, 1, 3, True, 0.5)])
def test_routing_matches_hf_deepseek_v3(groups, top_groups, top_k, normalize, scale):
    experts = 16
    router = _hf_router(experts, groups, top_groups, top_k, normalize, scale, seed=groups)
    h = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(7))
    _, hf_weights, hf_chosen = router(h)
    scores = torch.sigmoid(torch.nn.functional.linear(h, router.weight))  # [B,S,E]
    bias = router.e_score_correction_bias
    attrs = {"k": top_k, **({"groups": groups, "top_groups": top_groups} if groups > 1 else {})}
    weights, chosen = routing.topk(None, attrs, scores, bias)  # the reference kernels
    if normalize:
        weights = routing.renormalize(None, {}, weights)
    weights = routing.weight_scale(None, {"factor": scale}, weights).reshape(-1, top_k)
    program_weights, program_chosen = (snippets.select_grouped_experts(scores.reshape(-1, experts), top_k, groups, top_groups, bias)
                                       if groups > 1 else snippets.select_experts(scores.reshape(-1, experts), top_k, bias))
    if normalize:
        program_weights = program_weights / program_weights.sum(-1, keepdim=True)
    program_weights = program_weights * scale
    expected = _sorted_by_expert(hf_weights, hf_chosen)
    for w, c in (_sorted_by_expert(weights, chosen.reshape(-1, top_k)), _sorted_by_expert(program_weights, program_chosen)):
        assert torch.equal(c, expected[1])
        assert (w - expected[0]).abs().max().item() < 1e-6
    if groups > 1:  # the limit bites: some token's global top-k differs from its group-limited one
        free = torch.sort(scores.reshape(-1, experts) + bias, dim=-1, descending=True).indices[:, :top_k].sort(-1).values
        assert not torch.equal(free, expected[1])


def test_softmax_group_routing_matches_a_loop_per_token():
    """Softmax scores (DeepSeek-V2-Lite style): the same group rule, written token by token."""
    scores = torch.softmax(torch.randn(1, 20, 12, generator=torch.Generator().manual_seed(3)), -1)
    groups, top_groups, k = 3, 2, 3
    weights, chosen = routing.topk(None, {"k": k, "groups": groups, "top_groups": top_groups}, scores)
    for t in range(20):
        p = scores[0, t].tolist()
        group_score = [sum(sorted(p[g * 4:(g + 1) * 4], reverse=True)[:2]) for g in range(groups)]
        best = sorted(range(groups), key=lambda g: -group_score[g])[:top_groups]
        candidates = [e for e in range(12) if e // 4 in best]
        expected = sorted(candidates, key=lambda e: -p[e])[:k]
        assert chosen[0, t].tolist() == expected
        assert weights[0, t].tolist() == pytest.approx([p[e] for e in expected], abs=1e-7)


# --- the sequence-wise balance loss -------------------------------------------------------


def test_sequence_balance_loss_is_deepseek_v3s_formula():
    """L = weight * E * mean_b sum_e (c_be / S) * P_be, P_be the mean of s_et / sum_j s_jt over sequence b's S tokens:
    DeepSeek-V3's alpha * sum_e f_e * P_e (eq. 17-20, f_e = E / (k S) * c_e) with alpha = weight * top_k."""
    B, S, E, k, weight = 3, 10, 8, 2, 0.1
    generator = torch.Generator().manual_seed(0)
    scores = torch.sigmoid(torch.randn(B, S, E, generator=generator))
    chosen = torch.sort(scores, dim=-1, descending=True).indices[..., :k]
    expected = 0.0
    for b in range(B):
        f = [sum(int(e in chosen[b, t].tolist()) for t in range(S)) * E / (k * S) for e in range(E)]
        P = [sum((scores[b, t, e] / scores[b, t].sum()).item() for t in range(S)) / S for e in range(E)]
        expected += (weight * k) * sum(fe * pe for fe, pe in zip(f, P))  # alpha = weight * top_k
    expected /= B
    attrs = {"experts": E, "top_k": k, "weight": weight}
    reference = routing.load_balance_loss(None, {**attrs, "per_sequence": True}, scores, chosen)
    program = weight * snippets.sequence_load_balance_loss(scores.reshape(-1, E), chosen.reshape(-1, k), B, E)
    assert reference.item() == pytest.approx(expected, rel=1e-6)
    assert program.item() == pytest.approx(expected, rel=1e-6)
    batch = routing.load_balance_loss(None, attrs, scores, chosen)
    assert abs(batch.item() - expected) > 1e-4  # not the batch-wide loss ...
    one = routing.load_balance_loss(None, {**attrs, "per_sequence": True}, scores[:1], chosen[:1])
    assert one.item() == pytest.approx(routing.load_balance_loss(None, attrs, scores[:1], chosen[:1]).item(), rel=1e-6)  # ... but one sequence's


def test_compiled_training_steps_do_not_recompile():
    """fullgraph, a few optimizer steps with the routing changing: one graph, no recompile."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layers = ("        - kind: moe\n          experts: 8\n          top_k: 2\n          expert: {hidden: 8, activation: swiglu}\n"
              + VARIANTS["sequence_balance_groups"][0])
    spec = spec_with(layers, name="compiled")
    model = moec.build_model(spec).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    step = torch.compile(model, fullgraph=True)
    picks = []
    for seed in range(4):
        out = step(*model.example_inputs(batch=2, seq=8, seed=seed))
        (out.output.float().logsumexp(-1).mean() + out.aux_loss).backward()
        optimizer.step(), optimizer.zero_grad(set_to_none=True)
        picks.append(torch.cat([stats.counts for stats in out.moe_stats]))
    assert counters["stats"].get("unique_graphs") == 1, dict(counters["stats"])
    assert not dict(counters.get("recompiles", {}))
    assert any(not torch.equal(picks[0], p) for p in picks[1:])
