"""Lowering of feed-forward, MoE and spectral MoE layers into primitive ops.

MoE, unfused (each line one node; see docs/semantics.md for what each op means)::

    logits  = linear(router_in, router.weight)        # [B,S,E]
    noisy   = noise(logits)                           # only when the router has noise
    scores  = softmax | sigmoid | sinkhorn (noisy)    # [B,S,E]
    w, idx  = topk(scores [, selection_bias])         # [B,S,k]
    w       = renormalize(w)                          # router.normalize
    w, kept = capacity(scores, idx, w)                # capacity mode only
    xd      = dispatch(h, idx)                        # [B,S,k,D]
    yd      = expert_ffn(xd, idx [, kept], experts.*) # [B,S,k,D]
    out     = combine(yd, w) (+ shared experts' FFN)  # [B,S,D]
    aux     = load_balance_loss(scores, idx) + z_loss(logits)
"""

from __future__ import annotations

from moec.ir.graph import Ref
from moec.passes.builder import init_std
from moec.schema.model import GATED_ACTIVATIONS

BASE_ACTIVATION = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}


def lower_ffn(b, spec, h, prefix, path, width, hidden, activation, bias) -> Ref:
    std, out_std = init_std(spec), init_std(spec, output_projection=True)
    up = b.linear(h, f"{prefix}.w_up", hidden, width, path, std, f"{prefix}.b_up" if bias else None)
    if activation in GATED_ACTIVATIONS:
        gate = b.linear(h, f"{prefix}.w_gate", hidden, width, path, std)
        act = b.add("glu", [gate, up], path, fn=BASE_ACTIVATION[activation])
    else:
        act = b.add("activation", [up], path, fn=activation)
    return b.linear(act, f"{prefix}.w_down", width, hidden, path, out_std, f"{prefix}.b_down" if bias else None)


def lower_moe(b, spec, cfg, h, router_in, prefix, path, width, router_width=None) -> tuple[Ref, Ref]:
    """One MoE application on ``h`` [.., width]; returns (output, weighted aux loss)."""
    router, experts, k = cfg.router, cfg.experts, cfg.top_k
    rpath = path + ("router",)
    w_router = b.param(f"{prefix}.router.weight", (experts, router_width or width), rpath, std=init_std(spec), group="router")
    logits = b.add("linear", [router_in, w_router], rpath)
    noisy = logits if router.noise.kind == "none" else b.add("noise", [logits], rpath, kind=router.noise.kind, std=router.noise.std)
    scores = _scores(b, router, noisy, rpath)
    select = [scores]
    if router.kind == "sigmoid_bias":
        select.append(b.param(f"{prefix}.router.selection_bias", (experts,), rpath, init="zeros", group="router", trainable=False))
    weights, indices = b.add("topk", select, rpath, outputs=2, k=k)
    if router.normalize:
        weights = b.add("renormalize", [weights], rpath)
    kept = None
    if cfg.capacity.mode == "capacity":
        cpath = path + ("capacity",)
        weights, kept = b.add("capacity", [scores, indices, weights], cpath, outputs=2, factor=cfg.capacity.factor,
                              experts=experts, top_k=k, drop_policy=cfg.capacity.drop_policy)
    dispatched = b.add("dispatch", [h, indices], path)
    expert_out = _expert_ffn(b, spec, cfg, dispatched, indices, kept, prefix, path, width)
    out = b.add("combine", [expert_out, weights], path)
    if cfg.shared_experts is not None:
        shared = cfg.shared_experts
        # count shared experts of hidden H are one FFN of hidden count * H (their outputs add up).
        y = lower_ffn(b, spec, h, f"{prefix}.shared", path + ("shared_experts",), width, shared.count * shared.hidden,
                      cfg.expert.activation, False)
        out = b.add("add", [out, y], path + ("shared_experts",))
    return out, _aux(b, cfg, scores, indices, logits, path + ("aux",))


def _scores(b, router, logits, path) -> Ref:
    if router.kind == "topk":
        return b.add("softmax", [logits], path, temperature=router.temperature)
    if router.kind == "sigmoid_bias":
        return b.add("sigmoid", [logits], path, temperature=router.temperature)
    sinkhorn = router.sinkhorn
    return b.add("sinkhorn", [logits], path, iters=sinkhorn.iters, tau=sinkhorn.tau, temperature=router.temperature)


def _expert_ffn(b, spec, cfg, dispatched, indices, kept, prefix, path, width) -> Ref:
    expert, experts = cfg.expert, cfg.experts
    epath = path + ("expert",)
    std, out_std = init_std(spec), init_std(spec, output_projection=True)
    gated = expert.activation in GATED_ACTIVATIONS
    params = [b.param(f"{prefix}.experts.w_up", (experts, expert.hidden, width), epath, std=std, group="experts")]
    if gated:
        params.append(b.param(f"{prefix}.experts.w_gate", (experts, expert.hidden, width), epath, std=std, group="experts"))
    params.append(b.param(f"{prefix}.experts.w_down", (experts, width, expert.hidden), epath, std=out_std, group="experts"))
    if expert.bias:
        params.append(b.param(f"{prefix}.experts.b_up", (experts, expert.hidden), epath, init="zeros", group="bias"))
        params.append(b.param(f"{prefix}.experts.b_down", (experts, width), epath, init="zeros", group="bias"))
    inputs = [dispatched, indices] + ([kept] if kept is not None else []) + params
    return b.add("expert_ffn", inputs, epath, experts=experts, activation=expert.activation, masked=kept is not None, bias=expert.bias)


def _aux(b, cfg, scores, indices, logits, path) -> Ref:
    # Both terms are always lowered (a weight of 0 included), so that every MoE has the same
    # structure for fuse_moe to match; backends skip terms whose weight is 0.
    balance = b.add("load_balance_loss", [scores, indices], path, experts=cfg.experts, top_k=cfg.top_k, weight=cfg.aux.load_balance)
    z = b.add("z_loss", [logits], path, weight=cfg.aux.z_loss)
    return b.add("add", [balance, z], path)


def lower_spectral_moe(b, spec, layer, x, prefix, path) -> tuple[Ref, Ref]:
    """rfft -> real view -> (z + moe(z)) x depth with shared weights -> complex -> irfft."""
    width = 2 * spec.model.d_model
    spectrum = b.add("rfft", [x], path, norm=layer.fft_norm)
    z = b.add("complex_to_real", [spectrum], path)
    table = None
    if layer.band == "embedding":
        bins = spec.model.max_seq_len // 2 + 1
        table = b.param(f"{prefix}.band.weight", (bins, width), path + ("band",), std=init_std(spec), group="router")
    router_width = width + 1 if layer.band == "index_feature" else width
    aux_terms = []
    for _ in range(layer.depth):
        if layer.band == "embedding":
            router_in = b.add("band_embed", [z, table], path + ("band",))
        elif layer.band == "index_feature":
            router_in = b.add("band_index", [z], path + ("band",))
        else:
            router_in = z
        y, aux = lower_moe(b, spec, layer.moe, z, router_in, f"{prefix}.moe", path + ("moe",), width, router_width)
        z = b.add("add", [z, y], path)
        aux_terms.append(aux)
    total = aux_terms[0]
    for term in aux_terms[1:]:
        total = b.add("add", [total, term], path)
    out = b.add("real_to_complex", [z], path)
    return b.add("irfft", [out], path, norm=layer.fft_norm), total
