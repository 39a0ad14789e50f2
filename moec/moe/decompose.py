"""``decompose``: an MoE layer as primitive ops, written once.

Lowering calls it to build the unfused graph; ``fuse_moe`` calls it again on placeholders
and accepts a match only when the graph holds exactly this subgraph; the reference
interpreter runs it eagerly for a fused node. So lowering, fusion and the reference cannot
drift apart. The ops (each one node; semantics in docs/semantics.md)::

    router_in = rmsnorm | layernorm(router_in)        # router.norm
    logits  = linear(router_in, router.weight)        # [B,S,E]
    scores  = logits = token_route(router_in)         # router.kind token_id instead (no weight): router_in holds
                                                      # the token ids; one-hot [B,S,E], then topk(k=1) as below
    noisy   = noise(logits [, anneal])                # only when the router has noise; std from router.anneal[1] if annealed
    noisy   = band_mask(noisy)                        # spectral bands: -inf outside the bin's group of experts
    noisy   = anneal_temperature(noisy, anneal)       # router.temperature annealed: / router.anneal[0]
    scores  = <router score op>(noisy)                # softmax | sigmoid | sinkhorn: [B,S,E]
    w, idx  = topk(scores [, selection_bias], k=choices [, groups, top_groups])  # [B,S,k]; groups: router.groups > 1
    w       = router_dropout(w)                       # router.dropout (training only)
    w       = renormalize(w)                          # router.normalize
    w       = weight_scale(w)                         # router.scale != 1
    w, kept = capacity(scores, idx, w [, anneal])     # capacity mode only; factor router.anneal[2] if annealed
    xd      = dispatch(h, idx)                        # [B,S,k,D]
    yd      = expert_ffn(xd, idx [, kept], experts.*) # [B,S,k,D]; gated: one w_gate_up [E,2,H,D], gate half first
    out     = combine(yd, w)                          # [B,S,D]
    out     = fallback_add(out, ffn(h, fallback.*), kept)  # capacity.fallback 'dense': tokens every expert dropped
    out     = out (+ shared experts' FFN [* sigmoid(h @ shared_gate.T)])
    aux     = load_balance_loss(scores, idx) + z_loss(logits) [+ entropy_loss(scores)] [+ margin_loss(scores)]
                                                      # per_sequence: aux.load_balance_scope 'sequence'
    stats   = balance_stats(scores, idx)              # aux.load_balance_scope 'model': instead of
                                                      # load_balance_loss; the model pools them

A builder has ``add(op, inputs, path, outputs=1, **attrs) -> Ref | tuple[Ref]`` and
``mark_moe(out, aux, attrs, balance=None)``, told where each decomposition ends (lowering records it for
``fuse_moe``; other builders ignore it).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from moec.ir.graph import Ref
from moec.moe.activations import ACTIVATIONS
from moec.moe.anneal import ANNEAL
from moec.moe.attrs import MoeAttrs
from moec.moe.params import (EXPERT_PREFIX, FALLBACK_PREFIX, ROUTER_BIAS, ROUTER_NORM_BIAS, ROUTER_NORM_WEIGHT, ROUTER_WEIGHT, SELECTION_BIAS,
                              SHARED_GATE, expert_slots, ffn_slots)
from moec.moe.routers import ROUTERS

PLACEHOLDER = "@"  # prefix of the names that stand for a decomposition's inputs
ROUTER_NORM_EPS = 1e-5  # router.norm's epsilon


def placeholders(names: Sequence[str]) -> dict[str, Ref]:
    """Stand-in values for the inputs of a decomposition (``@h``, ``@router.weight``, ...)."""
    return {name: Ref(PLACEHOLDER + name) for name in names}


def ffn(b, x: Ref, weights: Sequence[Ref], activation: str, bias: bool, path: tuple, clamp: Mapping | None = None) -> Ref:
    """``down(fn(gate(x)) * up(x))`` for gated activations, else ``down(fn(up(x)))``; ``weights`` as in ``ffn_slots``.

    ``clamp``: ``limit`` and ``alpha`` of a clamped activation (``ExpertAttrs.clamp``).
    """
    kind = ACTIVATIONS[activation]
    params = dict(zip(ffn_slots("", activation, bias), weights))
    up = b.add("linear", [x, params["w_up"]] + ([params["b_up"]] if bias else []), path)
    if kind.gated:
        gate = b.add("linear", [x, params["w_gate"]] + ([params["b_gate"]] if bias else []), path)
        hidden = b.add("clamped_glu", [gate, up], path, **clamp) if kind.clamped else b.add("glu", [gate, up], path, fn=kind.fn)
    else:
        hidden = b.add("activation", [up], path, fn=kind.fn)
    return b.add("linear", [hidden, params["w_down"]] + ([params["b_down"]] if bias else []), path)


def decompose(b, attrs: MoeAttrs, h: Ref, router_in: Ref, params: Mapping[str, Ref], path: tuple = ()) -> tuple[Ref, ...]:
    """One MoE application on ``h``; ``params`` maps each slot of ``moe_slots(attrs)`` to its value.

    Returns (output, weighted aux loss), and with ``aux.load_balance_scope: model`` a third
    value: the layer's balance statistics [2, E] (the model pools them into one loss).
    """
    router, kind = attrs.router, ROUTERS[attrs.router.kind]
    rpath = path + ("router",)
    if not kind.learned:  # token_id: scores from the token ids in router_in; they stand in for the logits
        logits = scores = b.add(kind.score_op, [router_in], rpath, experts=attrs.experts, **kind.score_attrs(router))
        weights, indices = b.add("topk", [scores], rpath, outputs=2, k=attrs.choices)
        return _route_and_combine(b, attrs, h, params, path, logits, scores, weights, indices)
    if router.norm == "rmsnorm":
        router_in = b.add("rmsnorm", [router_in, params[ROUTER_NORM_WEIGHT]], rpath, eps=ROUTER_NORM_EPS)
    elif router.norm == "layernorm":
        router_in = b.add("layernorm", [router_in, params[ROUTER_NORM_WEIGHT], params[ROUTER_NORM_BIAS]], rpath, eps=ROUTER_NORM_EPS)
    logits = b.add("linear", [router_in, params[ROUTER_WEIGHT]] + ([params[ROUTER_BIAS]] if router.bias else []), rpath)
    anneal = attrs.anneal
    if router.noise == "none":
        noisy = logits
    else:
        std_from = [params[ANNEAL]] if anneal and anneal.noise_std else []
        noisy = b.add("noise", [logits, *std_from], rpath, kind=router.noise, std=router.noise_std)
    if router.bands:  # spectral per-band experts (path: the spectral layer's moe): -inf outside the bin's group
        noisy = b.add("band_mask", [noisy], path[:-1] + ("bands",), bands=router.bands)
    if anneal and anneal.temperature:
        noisy = b.add("anneal_temperature", [noisy, params[ANNEAL]], rpath)
    scores = b.add(kind.score_op, [noisy], rpath, **kind.score_attrs(router))
    select = [scores] + ([params[SELECTION_BIAS]] if kind.selection_bias else [])
    groups = {"groups": router.groups, "top_groups": router.top_groups} if router.groups > 1 else {}
    weights, indices = b.add("topk", select, rpath, outputs=2, k=attrs.choices, **groups)
    if router.dropout > 0:
        weights = b.add("router_dropout", [weights], rpath, p=router.dropout)
    if router.normalize:
        weights = b.add("renormalize", [weights], rpath)
    if router.scale != 1.0:
        weights = b.add("weight_scale", [weights], rpath, factor=router.scale)
    return _route_and_combine(b, attrs, h, params, path, logits, scores, weights, indices)


def _route_and_combine(b, attrs: MoeAttrs, h: Ref, params: Mapping[str, Ref], path: tuple, logits: Ref, scores: Ref, weights: Ref,
                       indices: Ref) -> tuple[Ref, ...]:
    """Capacity, dispatch, experts, combine, fallback, shared experts and aux losses of chosen ``indices``."""
    anneal = attrs.anneal
    kept = []
    if not attrs.dropless:
        capacity = attrs.capacity
        factor_from = [params[ANNEAL]] if anneal and anneal.capacity_factor else []
        weights, mask = b.add("capacity", [scores, indices, weights, *factor_from], path + ("capacity",), outputs=2, factor=capacity.factor,
                              experts=attrs.experts, top_k=attrs.top_k, drop_policy=capacity.drop_policy,
                              **({"tokens": capacity.tokens} if capacity.tokens else {}))
        kept = [mask]
    dispatched = b.add("dispatch", [h, indices], path)
    expert = attrs.expert
    expert_params = [params[slot] for slot in expert_slots(expert.activation, expert.bias)]
    expert_out = b.add("expert_ffn", [dispatched, indices, *kept, *expert_params], path + ("expert",),
                       experts=attrs.experts, activation=expert.activation, masked=bool(kept), bias=expert.bias, **expert.clamp)
    out = b.add("combine", [expert_out, weights], path)
    if attrs.capacity.fallback_weight:
        fpath = path + ("capacity",)
        dense = ffn(b, h, [params[slot] for slot in ffn_slots(FALLBACK_PREFIX, expert.activation, expert.bias)], expert.activation,
                    expert.bias, fpath, expert.clamp)
        out = b.add("fallback_add", [out, dense, kept[0]], fpath, weight=attrs.capacity.fallback_weight)
    if attrs.shared:
        spath = path + ("shared_experts",)
        shared = ffn(b, h, [params[slot] for slot in ffn_slots("shared.", expert.activation, False)], expert.activation, False, spath,
                     expert.clamp)
        if attrs.shared_gate:
            gate = b.add("linear", [h, params[SHARED_GATE]], spath)
            shared = b.add("sigmoid_gate", [shared, gate], spath)
        out = b.add("add", [out, shared], spath)
    apath = path + ("aux",)
    if attrs.aux.pooled:
        stats = b.add("balance_stats", [scores, indices], apath, experts=attrs.experts)
        z = _rewards(b, attrs, scores, b.add("z_loss", [logits], apath, weight=attrs.aux.z_loss), apath)
        b.mark_moe(out, z, attrs, balance=stats)
        return out, z, stats
    # Both terms are always there (a weight of 0 included): backends skip a term whose weight is 0.
    balance = b.add("load_balance_loss", [scores, indices], apath, experts=attrs.experts, top_k=attrs.top_k,
                    weight=attrs.aux.load_balance, **({"per_sequence": True} if attrs.aux.per_sequence else {}))
    z = b.add("z_loss", [logits], apath, weight=attrs.aux.z_loss)
    aux = _rewards(b, attrs, scores, b.add("add", [balance, z], apath), apath)
    b.mark_moe(out, aux, attrs)
    return out, aux


def _rewards(b, attrs: MoeAttrs, scores: Ref, aux: Ref, path: tuple) -> Ref:
    """``aux`` plus the entropy and margin terms whose weight is set (the m library's entropy_weight, margin_weight)."""
    for op, weight in (("entropy_loss", attrs.aux.entropy), ("margin_loss", attrs.aux.margin)):
        if weight > 0:
            aux = b.add("add", [aux, b.add(op, [scores], path, weight=weight)], path)
    return aux
