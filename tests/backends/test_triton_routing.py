"""moec's Triton router, permutation, combine and activation-epilogue kernels under Triton's
interpreter (TRITON_INTERPRET=1, CPU), forward and backward, against the torch lines the other
kernels generate (``select_experts``, ``argsort(stable=True)``, per-row GEMMs). Shapes are tiny
and ragged (not multiples of the blocks) so the masked edges and several blocks are exercised;
whole programs against the reference interpreter are in test_triton_kernels.py."""

import pytest
import torch
import torch.nn.functional as F

from moec.backends import triton as triton_moe
from moec.backends.torch.snippets import select_experts
from moec.moe import ACTIVATIONS

TOKENS, EXPERTS = 37, 6  # 3 router blocks of 16 tokens, the last one partial; 6 experts: a masked block of 8


def reference_route(logits, top_k, sigmoid, temperature, normalize, bias):
    scores = torch.sigmoid(logits / temperature) if sigmoid else torch.softmax(logits / temperature, dim=-1)
    weights, chosen = select_experts(scores, top_k, bias)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return scores, weights, chosen


@pytest.mark.parametrize("top_k, sigmoid, normalize, with_bias", [(2, False, False, False), (1, False, True, False), (3, True, True, True)],
                         ids=["softmax-top2", "softmax-top1-normalized", "sigmoid-bias-top3-normalized"])
def test_router_kernel_matches_torch_forward_and_backward(top_k, sigmoid, normalize, with_bias):
    torch.manual_seed(0)
    logits = torch.randn(TOKENS, EXPERTS)
    logits[5] = 0.25  # a tie everywhere: the lower experts win, as a stable sort
    logits = logits.requires_grad_()
    bias = 0.3 * torch.randn(EXPERTS) if with_bias else None
    scores, weights, chosen, block_counts = triton_moe.route(logits, top_k, sigmoid, 0.7, normalize, bias, block=16)
    want_scores, want_weights, want_chosen = reference_route(logits, top_k, sigmoid, 0.7, normalize, bias)
    assert torch.equal(chosen, want_chosen)
    if bias is None:
        assert chosen[5].tolist() == list(range(top_k))
    torch.testing.assert_close(scores, want_scores, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)
    assert block_counts.shape == (3, EXPERTS)
    assert torch.equal(block_counts[0], torch.bincount(want_chosen[:16].reshape(-1), minlength=EXPERTS).int())
    assert torch.equal(block_counts.sum(0), torch.bincount(want_chosen.reshape(-1), minlength=EXPERTS))
    grad_scores, grad_weights = torch.randn_like(scores), torch.randn_like(weights)
    got = torch.autograd.grad((scores * grad_scores).sum() + (weights * grad_weights).sum(), logits)[0]
    want = torch.autograd.grad((want_scores * grad_scores).sum() + (want_weights * grad_weights).sum(), logits, retain_graph=True)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    only_weights = torch.autograd.grad((triton_moe.route(logits, top_k, sigmoid, 0.7, normalize, bias, block=16)[1] * grad_weights).sum(), logits)[0]
    torch.testing.assert_close(only_weights, torch.autograd.grad((want_weights * grad_weights).sum(), logits)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows, groups, block_rows", [(600, 5, 8), (50, 7, 0)], ids=["75-blocks", "one-block"])
def test_permutation_is_the_stable_argsort_without_sorting(rows, groups, block_rows):
    torch.manual_seed(1)
    group = torch.randint(0, groups, (rows,))
    group[group == 3] = 0  # an empty group
    dest, order, totals = triton_moe.permute(group, groups, block_rows=block_rows)
    assert torch.equal(order, torch.argsort(group, stable=True))
    assert torch.equal(dest[order], torch.arange(rows))
    assert torch.equal(totals, torch.bincount(group, minlength=groups).int()) and totals[3] == 0


def test_permutation_from_the_routers_block_counts():
    torch.manual_seed(2)
    logits = torch.randn(TOKENS, EXPERTS)
    logits[:, 4] = -9.0  # expert 4 is never chosen
    _, _, chosen, block_counts = triton_moe.route(logits, 2, False, 1.0, False, None, block=16)
    flat_expert = chosen.reshape(-1)
    _, order, group_sizes = triton_moe.permute(flat_expert, EXPERTS, block_counts, 16 * 2)
    assert torch.equal(order, torch.argsort(flat_expert, stable=True))
    assert group_sizes[4] == 0 and group_sizes.sum() == TOKENS * 2


@pytest.mark.parametrize("top_k", [1, 3])
def test_combine_kernel_forward_and_backward(top_k):
    torch.manual_seed(3)
    width = 150  # two column chunks of 128, the second partial
    y = torch.randn(TOKENS * top_k, width, requires_grad=True)
    dest = torch.randperm(TOKENS * top_k)
    weights = torch.rand(TOKENS, top_k)
    weights[7, 0] = 0.0  # a dropped choice
    weights.requires_grad_()
    out = triton_moe.combine(y, weights, dest, tiles=(16,))
    want = weights[:, 0, None] * y[dest].view(TOKENS, top_k, width)[:, 0]
    for j in range(1, top_k):  # the reference's order
        want = want + weights[:, j, None] * y[dest].view(TOKENS, top_k, width)[:, j]
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(out)
    got, expected = torch.autograd.grad(out, (y, weights), grad), torch.autograd.grad(want, (y, weights), grad)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def clamped_glu(gate, up, limit=0.5, alpha=1.702):
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(gate * alpha))


@pytest.mark.parametrize("fn, gated, top_k, kept, bias", [("swiglu", True, 2, 20, False), ("geglu", True, 2, 13, True), ("relu", False, 1, 10, True),
                                                          ("gelu", False, 2, 13, False), ("clamped_swiglu", True, 2, 20, True)],
                         ids=["swiglu", "geglu-bias-drops", "relu-bias-top1", "gelu-drops", "clamped-swiglu-bias"])
def test_activation_epilogue_forward_and_backward_match_a_loop(fn, gated, top_k, kept, bias):
    torch.manual_seed(4)
    tokens, width, hidden, experts = 10, 40, 24, 4
    x = torch.randn(tokens, width, requires_grad=True)
    halves = (2,) if gated else ()  # gated: one [E, 2, H, D] weight, gate half first, as experts.w_gate_up
    w = (0.2 * torch.randn(experts, *halves, hidden, width)).requires_grad_()
    b = torch.randn(experts, *halves, hidden).requires_grad_() if bias else None
    w_gate, w_up = (w[:, 0], w[:, 1]) if gated else (None, w)
    b_gate, b_up = ((b[:, 0], b[:, 1]) if gated else (None, b)) if bias else (None, None)
    expert_of_choice = torch.tensor([0, 0, 2, 2, 2, 0, 3, 3, 0, 2, 0, 0, 2, 3, 3, 2, 0, 0, 2, 2])[: tokens * top_k]  # 1: empty
    order = torch.argsort(expert_of_choice, stable=True)
    sorted_experts = expert_of_choice[order]
    dropped = torch.arange(tokens * top_k) >= kept  # the last rows as if capacity dropped them
    counts = torch.stack([((sorted_experts == e) & ~dropped).sum() for e in range(experts)]).to(torch.int32)
    h = triton_moe.grouped_glu(x, w, counts, order, top_k, fn, limit=0.5, alpha=1.702, bias=b)
    rows = x[order // top_k]
    up = torch.einsum("md,mhd->mh", rows, w_up[sorted_experts]) + (b_up[sorted_experts] if bias else 0)
    gate = torch.einsum("md,mhd->mh", rows, w_gate[sorted_experts]) + (b_gate[sorted_experts] if bias else 0) if gated else None
    if fn == "clamped_swiglu":  # pre-activations of std ~1.3: both clamps (limit 0.5) active on part of the values
        want = clamped_glu(gate, up)
    else:
        act = getattr(F, ACTIVATIONS[fn].fn)
        want = act(gate) * up if gated else act(up)
    want = want * (~dropped)[:, None]
    assert (h[dropped] == 0).all()
    torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-5)
    params = tuple(t for t in (x, w, b) if t is not None)
    grad = torch.randn_like(h)
    got, expected = torch.autograd.grad(h, params, grad), torch.autograd.grad(want, params, grad)
    for a, b_ in zip(got, expected):
        assert a.shape == b_.shape
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)
    assert (got[1][1] == 0).all()  # the empty expert's weight gradient (both halves)
    if bias:
        assert (got[-1][1] == 0).all()  # and bias gradient


def test_the_gated_kernel_reads_w_gate_up_in_place(monkeypatch):
    """No copy of either half: the custom op gets the [E, 2, H, D] parameter's own storage, and its backward one
    gradient in that layout."""
    from moec.backends.triton import glu

    seen = []
    op = glu._grouped_glu
    monkeypatch.setattr(glu, "_grouped_glu", lambda x, w, *rest: seen.append(w) or op(x, w, *rest))
    torch.manual_seed(1)
    w = torch.randn(3, 2, 8, 16, requires_grad=True)
    x = torch.randn(5, 16)
    counts = torch.tensor([2, 0, 3], dtype=torch.int32)
    triton_moe.grouped_glu(x, w, counts, None, 1, "swiglu").sum().backward()
    assert seen[0].data_ptr() == w.data_ptr() and seen[0].shape == (3, 2, 8, 16)
    assert w.grad.shape == w.shape and (w.grad[1] == 0).all() and (w.grad[0] != 0).all()


def test_down_projection_bias_forward_and_backward_match_a_loop():
    torch.manual_seed(6)
    rows, hidden, width, experts = 17, 24, 40, 4
    h, w = torch.randn(rows, hidden, requires_grad=True), torch.randn(experts, width, hidden, requires_grad=True)
    bias = torch.randn(experts, width, requires_grad=True)
    counts = torch.tensor([6, 0, 5, 3], dtype=torch.int32)  # 14 of 17 rows kept: the last 3 never computed
    expert_of_row = torch.repeat_interleave(torch.arange(experts), counts.long())
    y = triton_moe.grouped_linear(h, w, counts, bias=bias)
    want = torch.cat([torch.einsum("mh,mdh->md", h[:14], w[expert_of_row]) + bias[expert_of_row], torch.zeros(3, width)])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (h, w, bias), grad), torch.autograd.grad(want, (h, w, bias), grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def moe_chain(x, router_w, w_gate_up, w_down, top_k):
    """The kernels as a generated program chains them: router, permutation, epilogue GEMM, down GEMM, combine."""
    _, weights, chosen, block_counts = triton_moe.route(x @ router_w.T, top_k, True, 1.0, True, None, block=16)
    dest, order, sizes = triton_moe.permute(chosen.reshape(-1), router_w.shape[0], block_counts, 16 * top_k)
    hidden = triton_moe.grouped_glu(x, w_gate_up, sizes, order, top_k, "swiglu")
    return triton_moe.combine(triton_moe.grouped_linear(hidden, w_down, sizes), weights, dest)


def test_the_kernel_chain_in_bf16_matches_fp32_to_bf16_precision():
    torch.manual_seed(5)
    x, router_w = torch.randn(TOKENS, 32), torch.randn(EXPERTS, 32)
    w_gate_up, w_down = 0.2 * torch.randn(EXPERTS, 2, 16, 32), 0.2 * torch.randn(EXPERTS, 32, 16)  # [E, 2, H, D], [E, D, H]
    results = []
    for dtype in (torch.float32, torch.bfloat16):  # the same bf16-rounded inputs: only the kernels' roundings differ
        tensors = [t.bfloat16().to(dtype).requires_grad_() for t in (x, router_w, w_gate_up, w_down)]
        out = moe_chain(*tensors, top_k=2)
        assert out.dtype == dtype
        out.float().square().sum().backward()
        results.append([out.float()] + [t.grad.float() for t in tensors])
    # Each stage stores bf16 (pre-activations, hidden, rows, output, gradients) as torch's unfused kernels would:
    # about 2% on the output and 3.5% on the gradients here (h alone: 0.9%); a wrong index or stride gives O(1).
    for want, got in zip(*results):
        assert ((got - want).norm() / want.norm()).item() < 5e-2


def test_the_kernel_modules_import_without_triton():
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"  # import triton now raises ImportError
            "import moec.backends.triton.routing, moec.backends.triton.glu, moec.backends.torch.codegen_triton\n"
            "import moec.backends.triton as t, torch\n"
            "try:\n    t.route(torch.zeros(2, 4), 1, False, 1.0, False)\nexcept RuntimeError as e:\n    print(e)\n")
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0", "PYTHONPATH": ":".join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "kernels.moe 'triton' runs on CUDA GPUs, or on the CPU under TRITON_INTERPRET=1 (tensors on cpu, triton is not installed)"
