"""Reference kernels for the fused ops, composed from the primitive kernels.

They call the primitive kernels in the order ``lower_moe`` writes the unfused graph, so
interpreting the fused graph gives the same numbers as interpreting the unfused one.
"""

from __future__ import annotations

from moec.backends.reference import dense
from moec.backends.reference import routing as r

_SCORES = {"topk": "softmax", "sigmoid_bias": "sigmoid", "sinkhorn": "sinkhorn"}


def moe(ctx, attrs, *inputs):
    slots = dict(zip(attrs["slots"], inputs))
    return moe_apply(ctx, attrs, slots["h"], slots["router_in"], slots)


def moe_apply(ctx, attrs, h, router_in, params: dict):
    logits = dense.linear(ctx, {}, router_in, params["router.weight"])
    noisy = r.noise(ctx, {"kind": attrs["noise"], "std": attrs["noise_std"]}, logits) if attrs["noise"] != "none" else logits
    scores = _scores(ctx, attrs, noisy)
    weights, indices = r.topk(ctx, {"k": attrs["top_k"]}, scores, params.get("router.selection_bias"))
    if attrs["normalize"]:
        weights = r.renormalize(ctx, {}, weights)
    kept = None
    if attrs["capacity"]:
        cap = {"factor": attrs["capacity_factor"], "experts": attrs["experts"], "top_k": attrs["top_k"], "drop_policy": attrs["drop_policy"]}
        weights, kept = r.capacity(ctx, cap, scores, indices, weights)
    dispatched = r.dispatch(ctx, {}, h, indices)
    names = ["experts.w_up", "experts.w_gate", "experts.w_down", "experts.b_up", "experts.b_down"]
    expert_params = [params[name] for name in names if name in params]
    ffn_attrs = {"experts": attrs["experts"], "activation": attrs["activation"], "masked": kept is not None, "bias": attrs["bias"]}
    expert_out = r.expert_ffn(ctx, ffn_attrs, dispatched, indices, *([kept] if kept is not None else []), *expert_params)
    out = r.combine(ctx, {}, expert_out, weights)
    if attrs["shared"]:
        out = out + r.ffn(h, attrs["activation"], params["shared.w_up"], params.get("shared.w_gate"), params["shared.w_down"])
    balance = r.load_balance_loss(ctx, {"experts": attrs["experts"], "top_k": attrs["top_k"], "weight": attrs["load_balance"]}, scores, indices)
    z = r.z_loss(ctx, {"weight": attrs["z_loss"]}, logits)
    return out, balance + z


def _scores(ctx, attrs, logits):
    kind = _SCORES[attrs["router"]]
    if kind == "sinkhorn":
        return r.sinkhorn(ctx, {"iters": attrs["sinkhorn_iters"], "tau": attrs["sinkhorn_tau"], "temperature": attrs["temperature"]}, logits)
    return getattr(r, kind)(ctx, {"temperature": attrs["temperature"]}, logits)


def spectral_moe(ctx, attrs, *inputs):
    """rfft -> real view -> depth x (z + moe(z)) with shared weights -> complex -> irfft."""
    slots = dict(zip(attrs["slots"], inputs))
    z = r.complex_to_real(ctx, {}, r.rfft(ctx, {"norm": attrs["fft_norm"]}, slots["x"]))
    aux = None
    for _ in range(attrs["depth"]):
        if attrs["band"] == "embedding":
            router_in = r.band_embed(ctx, {}, z, slots["band.weight"])
        elif attrs["band"] == "index_feature":
            router_in = r.band_index(ctx, {}, z)
        else:
            router_in = z
        y, step_aux = moe_apply(ctx, attrs, z, router_in, slots)
        z = z + y
        aux = step_aux if aux is None else aux + step_aux
    spectrum = r.real_to_complex(ctx, {}, z)
    return r.irfft(ctx, {"norm": attrs["fft_norm"]}, spectrum), aux


KERNELS = {"moe": moe, "spectral_moe": spectral_moe}
