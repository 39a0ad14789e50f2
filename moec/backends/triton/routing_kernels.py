"""Triton kernels around the expert GEMMs: the fused router, the sort-free permutation and the
weighted combine. Imported only when Triton is installed (``moec.backends.triton`` checks).

Shape legend: T tokens, E experts, K choices per token (top_k), R = T*K (token, choice) rows
in flat order (row r is token r // K, choice r % K), G groups of the permutation (E, or E + 1
with capacity: group E holds the dropped choices), B blocks of BR flat rows, D width.

``router_kernel``: per block of BT tokens, logits [BT, E] -> scores (softmax or sigmoid of
logits / temperature) -> top-K of (scores + selection bias) by K rounds of argmax (ties to the
lower expert, as a stable descending sort) -> weights = unbiased scores of the chosen experts,
renormalised to sum 1 when asked -> and the block's per-expert counts [E] (no atomics: one row
of ``block_counts`` per program; the totals are their column sums). ``router_backward_kernel``:
its gradient to the logits, per block of tokens.

``histogram_kernel``, ``scan_kernel``, ``rank_kernel``: the permutation without a sort. With
``block_counts[b, g]`` the rows of group g in block b, a single program scans the blocks
(``before[b, g]``: rows of g in earlier blocks; ``totals[g]``). Each block then gives its row r
of group g the destination ``start[g] + before[b, g] + (rows of g before r in the block)``,
the in-block rank coming from a cumulative sum over a one-hot [BR, G] tile. That is exactly the
stable order of ``argsort(group, stable=True)``: groups in order, rows in flat order within a
group. ``order[dest[r]] = r`` is written as a permutation (each slot once).

``combine_kernel``: ``out[t] = sum_j w[t, j] * y[dest[t*K + j]]`` summed in choice order in
fp32 (deterministic: no atomics, no sort); ``combine_backward_kernel``: ``grad_y[dest[t*K+j]]
= w[t, j] * grad_out[t]`` (each row written once) and ``grad_w[t, j] = <grad_out[t], y[dest]>``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def router_kernel(logits_ptr, bias_ptr, scores_ptr, weights_ptr, chosen_ptr, block_counts_ptr, T, E, temperature,
                  K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
                  BT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    block = tl.program_id(0)
    tokens = block * BT + tl.arange(0, BT)
    experts = tl.arange(0, BLOCK_E)
    t_ok = tokens < T
    e_ok = experts < E
    ok = t_ok[:, None] & e_ok[None, :]
    logits = tl.load(logits_ptr + tokens[:, None] * E + experts[None, :], mask=ok, other=0.0).to(tl.float32) / temperature
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        logits = tl.where(e_ok[None, :], logits, float("-inf"))
        exp = tl.exp(logits - tl.max(logits, 1)[:, None])
        scores = exp / tl.sum(exp, 1)[:, None]
    tl.store(scores_ptr + tokens[:, None] * E + experts[None, :], scores.to(scores_ptr.dtype.element_ty), mask=ok)
    select = scores
    if HAS_BIAS:
        select = select + tl.load(bias_ptr + experts, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    select = tl.where(e_ok[None, :], select, float("-inf"))
    slots = tl.arange(0, BLOCK_K)
    weights = tl.zeros((BT, BLOCK_K), dtype=tl.float32)
    chosen = tl.zeros((BT, BLOCK_K), dtype=tl.int32)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for j in tl.static_range(K):  # K rounds of argmax: the j-th best expert of every token
        best = tl.max(select, 1)
        pick = tl.min(tl.where(select == best[:, None], experts[None, :], BLOCK_E), 1)
        hit = experts[None, :] == pick[:, None]
        weights = tl.where(slots[None, :] == j, tl.sum(tl.where(hit, scores, 0.0), 1)[:, None], weights)
        chosen = tl.where(slots[None, :] == j, pick[:, None], chosen)
        counts += tl.sum((hit & t_ok[:, None]).to(tl.int32), 0)
        select = tl.where(hit, float("-inf"), select)
    if NORMALIZE:
        weights = weights / tl.sum(weights, 1)[:, None]
    out = tokens[:, None] * K + slots[None, :]
    out_ok = t_ok[:, None] & (slots < K)[None, :]
    tl.store(chosen_ptr + out, chosen.to(chosen_ptr.dtype.element_ty), mask=out_ok)
    tl.store(weights_ptr + out, weights.to(weights_ptr.dtype.element_ty), mask=out_ok)
    tl.store(block_counts_ptr + block * E + experts, counts, mask=e_ok)


@triton.jit
def router_backward_kernel(scores_ptr, weights_ptr, chosen_ptr, grad_scores_ptr, grad_weights_ptr, grad_logits_ptr, T, E,
                           temperature, K: tl.constexpr, SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr,
                           HAS_GRAD_SCORES: tl.constexpr, BT: tl.constexpr, BLOCK_E: tl.constexpr):
    """d logits from d scores and d weights: the weights' gradient back through the renormalisation
    (``w = s / sum(s)``: ``ds = (dw - <dw, w>) / sum(s)``) into the chosen columns, then through
    softmax or sigmoid and the temperature."""
    tokens = tl.program_id(0) * BT + tl.arange(0, BT)
    experts = tl.arange(0, BLOCK_E)
    t_ok = tokens < T
    ok = t_ok[:, None] & (experts < E)[None, :]
    tile = tokens[:, None] * E + experts[None, :]
    scores = tl.load(scores_ptr + tile, mask=ok, other=0.0).to(tl.float32)
    if HAS_GRAD_SCORES:
        grad = tl.load(grad_scores_ptr + tile, mask=ok, other=0.0).to(tl.float32)
    else:
        grad = tl.zeros((BT, BLOCK_E), dtype=tl.float32)
    inner = tl.zeros((BT,), dtype=tl.float32)
    total = tl.zeros((BT,), dtype=tl.float32)
    if NORMALIZE:
        for j in tl.static_range(K):
            pick = tl.load(chosen_ptr + tokens * K + j, mask=t_ok, other=0)
            inner += tl.load(grad_weights_ptr + tokens * K + j, mask=t_ok, other=0.0).to(tl.float32) * \
                tl.load(weights_ptr + tokens * K + j, mask=t_ok, other=0.0).to(tl.float32)
            total += tl.sum(tl.where(experts[None, :] == pick[:, None], scores, 0.0), 1)
    for j in tl.static_range(K):
        pick = tl.load(chosen_ptr + tokens * K + j, mask=t_ok, other=0)
        grad_weight = tl.load(grad_weights_ptr + tokens * K + j, mask=t_ok, other=0.0).to(tl.float32)
        if NORMALIZE:
            grad_weight = (grad_weight - inner) / tl.where(t_ok, total, 1.0)
        grad += tl.where(experts[None, :] == pick[:, None], grad_weight[:, None], 0.0)
    if SIGMOID:
        grad_logits = grad * scores * (1.0 - scores)
    else:
        grad_logits = scores * (grad - tl.sum(grad * scores, 1)[:, None])
    tl.store(grad_logits_ptr + tile, (grad_logits / temperature).to(grad_logits_ptr.dtype.element_ty), mask=ok)


@triton.jit
def histogram_kernel(group_ptr, block_counts_ptr, R, G, BR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    block = tl.program_id(0)
    local = tl.arange(0, BLOCK_R)
    rows = block * BR + local
    ok = (local < BR) & (rows < R)
    group = tl.load(group_ptr + rows, mask=ok, other=BLOCK_G)
    groups = tl.arange(0, BLOCK_G)
    counts = tl.sum((group[:, None] == groups[None, :]).to(tl.int32), 0)
    tl.store(block_counts_ptr + block * G + groups, counts, mask=groups < G)


@triton.jit
def scan_kernel(block_counts_ptr, before_ptr, totals_ptr, B, G, BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr):
    """One program: exclusive prefix sums of ``block_counts`` down the blocks, with a carry."""
    groups = tl.arange(0, BLOCK_G)
    g_ok = groups < G
    carry = tl.zeros((BLOCK_G,), dtype=tl.int32)
    for b0 in range(0, B, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        ok = (blocks < B)[:, None] & g_ok[None, :]
        counts = tl.load(block_counts_ptr + blocks[:, None] * G + groups[None, :], mask=ok, other=0)
        before = carry[None, :] + tl.cumsum(counts, 0) - counts
        tl.store(before_ptr + blocks[:, None] * G + groups[None, :], before, mask=ok)
        carry += tl.sum(counts, 0)
    tl.store(totals_ptr + groups, carry, mask=g_ok)


@triton.jit
def rank_kernel(group_ptr, before_ptr, totals_ptr, dest_ptr, order_ptr, R, G, BR: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_G: tl.constexpr):
    block = tl.program_id(0)
    local = tl.arange(0, BLOCK_R)
    rows = block * BR + local
    ok = (local < BR) & (rows < R)
    groups = tl.arange(0, BLOCK_G)
    g_ok = groups < G
    totals = tl.load(totals_ptr + groups, mask=g_ok, other=0)
    start = tl.cumsum(totals, 0) - totals + tl.load(before_ptr + block * G + groups, mask=g_ok, other=0)  # [G]
    group = tl.load(group_ptr + rows, mask=ok, other=BLOCK_G)
    one_hot = (group[:, None] == groups[None, :]).to(tl.int32)  # [BR, G]
    earlier = tl.cumsum(one_hot, 0) - one_hot  # rows of the same group before this one in the block
    dest = tl.sum(one_hot * (earlier + start[None, :]), 1)
    tl.store(dest_ptr + rows, dest.to(dest_ptr.dtype.element_ty), mask=ok)
    tl.store(order_ptr + dest, rows.to(order_ptr.dtype.element_ty), mask=ok)


@triton.jit
def combine_kernel(y_ptr, w_ptr, dest_ptr, out_ptr, T, D, stride_y, stride_o, K: tl.constexpr, BT: tl.constexpr,
                   BD: tl.constexpr):
    tokens = tl.program_id(0) * BT + tl.arange(0, BT)
    t_ok = tokens < T
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        ok = t_ok[:, None] & (cols < D)[None, :]
        acc = tl.zeros((BT, BD), dtype=tl.float32)
        for j in tl.static_range(K):  # choices in order: the same sum every run
            row = tl.load(dest_ptr + tokens * K + j, mask=t_ok, other=0)
            w = tl.load(w_ptr + tokens * K + j, mask=t_ok, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row[:, None] * stride_y + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            acc += w[:, None] * y
        tl.store(out_ptr + tokens[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def combine_backward_kernel(grad_ptr, y_ptr, w_ptr, dest_ptr, grad_y_ptr, grad_w_ptr, T, D, stride_g, stride_y,
                            K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    tokens = tl.program_id(0) * BT + tl.arange(0, BT)
    t_ok = tokens < T
    for j in tl.static_range(K):
        row = tl.load(dest_ptr + tokens * K + j, mask=t_ok, other=0)
        w = tl.load(w_ptr + tokens * K + j, mask=t_ok, other=0.0).to(tl.float32)
        dot = tl.zeros((BT,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            ok = t_ok[:, None] & (cols < D)[None, :]
            g = tl.load(grad_ptr + tokens[:, None] * stride_g + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row[:, None] * stride_y + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            tl.store(grad_y_ptr + row[:, None] * stride_y + cols[None, :], (w[:, None] * g).to(grad_y_ptr.dtype.element_ty), mask=ok)
            dot += tl.sum(g * y, 1)
        tl.store(grad_w_ptr + tokens * K + j, dot.to(grad_w_ptr.dtype.element_ty), mask=t_ok)
