"""Router, capacity and aux-loss semantics of the reference kernels against hand-computed values."""

import math
from types import SimpleNamespace

import pytest
import torch

from moec.backends.reference import dense
from moec.backends.reference import routing as r
from moec.backends.torch import snippets

EVAL = SimpleNamespace(training=False, device=torch.device("cpu"), symbols={})


def test_softmax_topk_breaks_ties_to_the_lower_expert_and_renormalizes():
    logits = torch.log(torch.tensor([[[0.1, 0.3, 0.3, 0.3]]]))  # probs 0.1, 0.3, 0.3, 0.3
    probs = r.softmax(EVAL, {"temperature": 1.0}, logits)
    weights, indices = r.topk(EVAL, {"k": 2}, probs)
    assert indices.tolist() == [[[1, 2]]]
    torch.testing.assert_close(weights, torch.tensor([[[0.3, 0.3]]]))
    torch.testing.assert_close(r.renormalize(EVAL, {}, weights), torch.tensor([[[0.5, 0.5]]]))


def test_temperature_sharpens_softmax():
    logits = torch.tensor([[[1.0, 0.0]]])
    cold = r.softmax(EVAL, {"temperature": 0.5}, logits)
    assert cold[0, 0, 0].item() == pytest.approx(math.exp(2) / (math.exp(2) + 1))


def test_sigmoid_bias_changes_selection_but_not_weights():
    scores = r.sigmoid(EVAL, {"temperature": 1.0}, torch.tensor([[[2.0, 1.0, 0.0]]]))
    bias = torch.tensor([0.0, 0.0, 1.0])  # pushes expert 2 ahead of expert 1
    weights, indices = r.topk(EVAL, {"k": 2}, scores, bias)
    assert indices.tolist() == [[[2, 0]]]
    torch.testing.assert_close(weights, torch.tensor([[[0.5, 1 / (1 + math.exp(-2))]]]))


def _naive_sinkhorn(logits: torch.Tensor, iters: int, tau: float) -> torch.Tensor:
    """Sinkhorn-Knopp as written in the `m` library: u, v scaling of K = exp(logits / tau)."""
    kernel = torch.exp(logits / tau).double()
    tokens, experts = kernel.shape
    row_sums, col_sums = torch.ones(tokens, dtype=torch.float64), torch.full((experts,), tokens / experts, dtype=torch.float64)
    u, v = torch.ones(tokens, dtype=torch.float64), torch.ones(experts, dtype=torch.float64)
    for _ in range(iters):
        u = row_sums / (kernel @ v)
        v = col_sums / (kernel.t() @ u)
    return (u[:, None] * kernel * v[None, :]).float()


def test_sinkhorn_matches_the_scaling_form_and_balances_experts():
    logits = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    balanced = r.sinkhorn(EVAL, {"iters": 5, "tau": 0.7, "temperature": 1.0}, logits)
    expected = _naive_sinkhorn(logits.reshape(12, 4), 5, 0.7).reshape(2, 6, 4)
    torch.testing.assert_close(balanced, expected, rtol=1e-5, atol=1e-6)
    many = r.sinkhorn(EVAL, {"iters": 200, "tau": 0.7, "temperature": 1.0}, logits).reshape(12, 4)
    torch.testing.assert_close(many.sum(0), torch.full((4,), 3.0), rtol=1e-4, atol=1e-4)  # N/E = 12/4
    torch.testing.assert_close(many.sum(1), torch.ones(12), rtol=1e-4, atol=1e-4)


def test_capacity_keeps_each_experts_highest_scores_whatever_the_token_order():
    # 4 tokens, 2 experts, top-1, factor 1.0: C = floor(1.0 * 4 * 1 / 2) = 2 per expert.
    scores = torch.tensor([[[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.2, 0.8]]])
    weights, indices = r.topk(EVAL, {"k": 1}, scores)
    attrs = {"factor": 1.0, "experts": 2, "top_k": 1, "drop_policy": "zero"}
    new_weights, kept = r.capacity(EVAL, attrs, scores, indices, weights)
    # Expert 0 was chosen by tokens 0, 1, 2 (scores 0.6, 0.9, 0.7): token 0 (lowest) is dropped.
    assert kept.squeeze(-1).tolist() == [[False, True, True, True]]
    torch.testing.assert_close(new_weights.squeeze(-1), torch.tensor([[0.0, 0.9, 0.7, 0.8]]))
    order = torch.tensor([2, 0, 3, 1])
    _, kept_shuffled = r.capacity(EVAL, attrs, scores[:, order], indices[:, order], weights[:, order])
    assert kept_shuffled[0, :, 0].tolist() == kept[0, order, 0].tolist()


def test_capacity_renormalize_policy_rescales_a_tokens_kept_choices():
    # 2 tokens, 2 experts, top-2, factor 0.5: C = floor(0.5 * 2 * 2 / 2) = 1 per expert.
    scores = torch.tensor([[[0.7, 0.3], [0.6, 0.4]]])
    weights, indices = r.topk(EVAL, {"k": 2}, scores)
    attrs = {"factor": 0.5, "experts": 2, "top_k": 2, "drop_policy": "renormalize"}
    new_weights, kept = r.capacity(EVAL, attrs, scores, indices, weights)
    # Expert 0 keeps token 0 (0.7 > 0.6); expert 1 keeps token 1 (0.4 > 0.3).
    assert kept.tolist() == [[[True, False], [False, True]]]
    torch.testing.assert_close(new_weights, torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    assert snippets.capacity_of(tokens=3, factor=0.1, top_k=1, experts=8) == 1  # never zero


def test_load_balance_loss_is_the_hf_mixtral_formula():
    scores = torch.softmax(torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1)), -1)
    _, indices = r.topk(EVAL, {"k": 2}, scores)
    got = r.load_balance_loss(EVAL, {"experts": 4, "top_k": 2, "weight": 1.0}, scores, indices)
    # HF transformers' load_balancing_loss_func, written out.
    mask = torch.nn.functional.one_hot(indices.reshape(10, 2), 4).float()  # [N, k, E]
    tokens_per_expert = mask.mean(0)  # [k, E]
    prob_per_expert = scores.reshape(10, 4).mean(0)  # [E]
    expected = (tokens_per_expert * prob_per_expert[None]).sum() * 4
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    uniform = torch.full((1, 8, 4), 0.25)
    balanced_idx = torch.tensor([[[0, 1], [2, 3]] * 4])
    assert r.load_balance_loss(EVAL, {"experts": 4, "top_k": 2, "weight": 0.5}, uniform, balanced_idx).item() == pytest.approx(0.5 * 2)


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.zeros(1, 3, 4)
    assert r.z_loss(EVAL, {"weight": 2.0}, logits).item() == pytest.approx(2.0 * math.log(4) ** 2)


def test_expert_ffn_and_combine_follow_the_chosen_experts():
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(1, 3, 4, generator=gen)
    w_up, w_down = torch.randn(2, 5, 4, generator=gen), torch.randn(2, 4, 5, generator=gen)
    indices = torch.tensor([[[0, 1], [1, 0], [1, 1]]])
    weights = torch.tensor([[[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]]])
    kept = torch.tensor([[[True, True], [True, True], [True, False]]])
    y = r.expert_ffn(EVAL, {"experts": 2, "activation": "relu", "masked": True, "bias": False}, r.dispatch(EVAL, {}, h, indices), indices, kept, w_up, w_down)
    out = r.combine(EVAL, {}, y, weights)

    def expert(e, x):
        return torch.relu(x @ w_up[e].T) @ w_down[e].T

    expected = torch.stack([0.25 * expert(0, h[0, 0]) + 0.75 * expert(1, h[0, 0]), expert(1, h[0, 1]), 0.5 * expert(1, h[0, 2])])
    torch.testing.assert_close(out[0], expected)


def test_attention_matches_torch_sdpa_with_gqa():
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 5, 4 * 8, generator=gen), torch.randn(2, 5, 2 * 8, generator=gen), torch.randn(2, 5, 2 * 8, generator=gen)
    got = dense.attention(EVAL, {"heads": 4, "kv_heads": 2, "head_dim": 8, "causal": True}, q, k, v)
    qh = q.view(2, 5, 4, 8).transpose(1, 2)
    kh, vh = (t.view(2, 5, 2, 8).transpose(1, 2).repeat_interleave(2, 1) for t in (k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(1, 2).reshape(2, 5, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_rope_is_a_complex_rotation_of_half_split_pairs():
    x = torch.randn(1, 6, 2 * 8, generator=torch.Generator().manual_seed(4))
    got = dense.rope(EVAL, {"heads": 2, "head_dim": 8, "theta": 10000.0}, x)
    xh = x.view(1, 6, 2, 8)
    pairs = torch.complex(xh[..., :4], xh[..., 4:])  # (i, i + head_dim/2)
    freqs = 10000.0 ** (-torch.arange(0, 8, 2).float() / 8)
    rotation = torch.polar(torch.ones(6, 4), torch.arange(6).float()[:, None] * freqs)
    rotated = pairs * rotation[None, :, None, :]
    expected = torch.cat([rotated.real, rotated.imag], -1).reshape(1, 6, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
