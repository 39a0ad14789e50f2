"""Reference kernels for routing, experts, aux losses and the spectral transform.

Written as the definition of the semantics (docs/semantics.md): per-expert loops, stable
sorts, fixed reduction orders. Shapes: B batch, S sequence, E experts, k top_k, D width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moec.backends.torch import snippets
from moec.moe import ACTIVATIONS, ffn_slots


def noise(ctx, attrs, logits, anneal=None):
    """Exploration noise while training; the identity in eval mode. Annealed: std is anneal[1]."""
    return snippets.router_noise(logits, attrs["kind"], attrs["std"] if anneal is None else anneal[1], ctx.training)


def anneal_temperature(ctx, attrs, logits, anneal):
    """An annealed router temperature: logits / anneal[0] (the score op then divides by 1)."""
    return logits / anneal[0]


def band_mask(ctx, attrs, logits):
    """Spectral per-band experts: bin f of F (dim 1) is in group g = floor(f * bands / F) and keeps the logits
    of experts g * E / bands ... (g + 1) * E / bands - 1; the others become -inf."""
    bins, experts, bands = logits.shape[1], logits.shape[-1], attrs["bands"]
    allowed = torch.zeros(bins, experts, dtype=torch.bool, device=logits.device)
    for f in range(bins):
        group = f * bands // bins
        allowed[f, group * experts // bands : (group + 1) * experts // bands] = True
    return logits.masked_fill(~allowed, float("-inf"))


def softmax(ctx, attrs, logits):
    return torch.softmax(logits / attrs["temperature"], dim=-1)


def sigmoid(ctx, attrs, logits):
    return torch.sigmoid(logits / attrs["temperature"])


def sinkhorn(ctx, attrs, logits):
    """Balance the [tokens, experts] kernel exp(logits / (temperature * tau)) in log space.

    Each iteration makes every token's row sum to 1, then every expert's column sum to
    N/E, over all N = B*S tokens of the batch. Returns the balanced matrix P.
    With ``topk``, each token's kernel keeps its topk highest logits (ties to the lower
    expert); the others are 0. A column with no candidate stays 0.
    """
    shape = logits.shape
    log_k = logits.reshape(-1, shape[-1]) / (attrs["temperature"] * attrs["tau"])
    tokens, experts = log_k.shape
    outside = torch.zeros_like(log_k, dtype=torch.bool)
    if attrs.get("topk"):
        order = torch.sort(log_k.detach(), dim=-1, descending=True, stable=True).indices
        outside[:] = True
        for token in range(tokens):
            outside[token, order[token, : attrs["topk"]]] = False
        log_k = log_k.masked_fill(outside, float("-inf"))
    empty = outside.all(0, keepdim=True)  # experts that are no token's candidate: their column stays 0
    row = torch.zeros(tokens, 1, device=logits.device)
    col = torch.zeros(1, experts, device=logits.device)
    for _ in range(attrs["iters"]):
        row = -torch.logsumexp(log_k + col, dim=1, keepdim=True)
        lse = torch.logsumexp(torch.where(empty, 0.0, log_k + row), dim=0, keepdim=True)
        col = math.log(tokens / experts) - torch.where(empty, 0.0, lse)
    return torch.exp(log_k + row + col).reshape(shape)


def token_route(ctx, attrs, ids):
    """One-hot scores [B,S,E]: token id t goes to expert table[t mod len(table)], or t mod E without a table."""
    experts, table = attrs["experts"], tuple(attrs.get("table", ())) or tuple(range(attrs["experts"]))
    scores = torch.zeros(*ids.shape, experts, device=ids.device)
    for position, token in enumerate(ids.reshape(-1).tolist()):
        scores.view(-1, experts)[position, table[token % len(table)]] = 1.0
    return scores


def topk(ctx, attrs, scores, selection_bias=None):
    """The k highest (scores + bias) per token, ties to the lower expert; weights are the unbiased scores.

    Group-limited (``groups``, ``top_groups``): expert e is in group e // (E / groups); a group's score
    is the sum of its two highest (scores + bias); only the experts of a token's top_groups best groups
    (ties to the lower group) are candidates.
    """
    select = scores if selection_bias is None else scores + selection_bias
    if "groups" in attrs:
        select = _group_limited(select, attrs["groups"], attrs["top_groups"])
    indices = torch.sort(select, dim=-1, descending=True, stable=True).indices[..., : attrs["k"]]
    return scores.gather(-1, indices), indices


def _group_limited(select, groups, top_groups):
    """``select`` with -inf outside each token's top_groups best groups (group score: the sum of its best two)."""
    size = select.shape[-1] // groups
    group_scores = torch.stack([torch.sort(select[..., g * size : (g + 1) * size], dim=-1, descending=True).values[..., :2].sum(-1)
                                for g in range(groups)], dim=-1)  # [B,S,groups]
    best = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[..., :top_groups]
    masked = torch.full_like(select, float("-inf"))
    for g in range(groups):
        inside = (best == g).any(-1, keepdim=True)
        masked[..., g * size : (g + 1) * size] = torch.where(inside, select[..., g * size : (g + 1) * size], float("-inf"))
    return masked


def weight_scale(ctx, attrs, weights):
    """router.scale: the combine weights times ``factor`` (DeepSeek's routed_scaling_factor), after renormalisation."""
    return weights * attrs["factor"]


def router_dropout(ctx, attrs, weights):
    """Training only: per token, with probability p, the best choice's weight becomes 0."""
    return snippets.router_dropout(weights, attrs["p"], ctx.training)


def entropy_loss(ctx, attrs, scores):
    """-weight * mean over tokens of H(p), p = scores / sum(scores) per token (an entropy reward)."""
    probs = scores / scores.sum(-1, keepdim=True)
    return -attrs["weight"] * (-(probs * probs.clamp_min(1e-12).log()).sum(-1)).mean()


def margin_loss(ctx, attrs, scores):
    """-weight * mean over tokens of (p_top1 - p_top2), p as in entropy_loss (a reward on a clear preference)."""
    probs = scores / scores.sum(-1, keepdim=True)
    ranked = torch.sort(probs, dim=-1, descending=True).values
    return -attrs["weight"] * (ranked[..., 0] - ranked[..., 1]).mean()


def renormalize(ctx, attrs, weights):
    return weights / weights.sum(-1, keepdim=True)


def capacity(ctx, attrs, scores, indices, weights, anneal=None):
    """Each expert keeps the C (token, choice) pairs with the highest router score.

    Order-agnostic (Switch / `m` style): a token's position in the batch does not matter
    except to break exact ties (lower token index first). Dropped choices get weight 0;
    with drop_policy 'renormalize' a token's kept weights are rescaled to sum to 1. An annealed
    factor is anneal[2], C at most the ``factor`` attribute's (the schedule's peak). With ``tokens``
    (capacity.tokens) C is that number, whatever the batch.
    """
    experts = attrs["experts"]
    flat_idx = indices.reshape(-1)
    choice_scores = scores.gather(-1, indices).reshape(-1)
    tokens = indices.shape[0] * indices.shape[1]
    limit = attrs.get("tokens") or snippets.capacity_of(tokens, attrs["factor"], attrs["top_k"], experts)  # capacity.tokens: C given
    if anneal is not None:
        limit = min(limit, int(snippets.annealed_capacity(anneal[2], tokens, attrs["top_k"], experts).item()))
    kept = torch.zeros_like(flat_idx, dtype=torch.bool)
    for expert in range(experts):
        slots = torch.nonzero(flat_idx == expert).squeeze(-1)
        order = torch.sort(choice_scores[slots].detach(), descending=True, stable=True).indices
        kept[slots[order[:limit]]] = True
    kept = kept.reshape(indices.shape)
    weights = weights * kept
    if attrs["drop_policy"] == "renormalize":
        weights = snippets.renormalize_kept(weights)
    return weights, kept


def dispatch(ctx, attrs, h, indices):
    """Each token once per chosen expert: [B,S,D] -> [B,S,k,D]."""
    return h.unsqueeze(-2).expand(*indices.shape, h.shape[-1])


def expert_ffn(ctx, attrs, x, indices, *rest):
    """Row (b, s, j) goes through expert indices[b, s, j]; a dropped row gives 0."""
    kept = rest[0] if attrs["masked"] else None
    params = list(rest[1:] if attrs["masked"] else rest)
    weights = unpack_expert_params(params, attrs["activation"], attrs["bias"], fused=True)
    clamp = (attrs.get("limit"), attrs.get("alpha"))
    out = torch.zeros_like(x)
    for expert in range(attrs["experts"]):
        mask = indices == expert if kept is None else (indices == expert) & kept
        rows = x[mask]
        y = ffn(rows, attrs["activation"], *(w[expert] if w is not None else None for w in weights), clamp=clamp)
        out[mask] = y.to(out.dtype)  # under autocast the FFN computes in bf16 / fp16; rows stay in x's dtype
    return out


def unpack_expert_params(params: list, activation: str, bias: bool, fused: bool = False) -> tuple:
    """(w_up, w_gate, w_down, b_up, b_down, b_gate) with None for what the expert does not have; ``fused`` (routed
    experts): a gated expert's ``w_gate_up`` [E, 2, H, D] and ``b_gate_up`` [E, 2, H] give gate (index 0) and up."""
    named = dict(zip(ffn_slots("", activation, bias, fused=fused), params))
    for stem in ("w", "b"):
        if f"{stem}_gate_up" in named:
            named[f"{stem}_gate"], named[f"{stem}_up"] = named.pop(f"{stem}_gate_up").unbind(1)
    return tuple(named.get(name) for name in ("w_up", "w_gate", "w_down", "b_up", "b_down", "b_gate"))


def ffn(x, activation, w_up, w_gate, w_down, b_up=None, b_down=None, b_gate=None, clamp=(None, None)):
    """down(fn(gate(x)) * up(x)) for gated activations, else down(fn(up(x))); clamped_glu for clamped ones."""
    kind = ACTIVATIONS[activation]
    up = F.linear(x, w_up, b_up)
    if kind.clamped:
        hidden = snippets.clamped_glu(F.linear(x, w_gate, b_gate), up, *clamp)
    else:
        hidden = getattr(F, kind.fn)(F.linear(x, w_gate, b_gate)) * up if kind.gated else getattr(F, kind.fn)(up)
    return F.linear(hidden, w_down, b_down)


def fallback_add(ctx, attrs, out, dense, kept):
    """capacity.fallback 'dense': out + weight * dense for the tokens whose every choice was dropped."""
    all_dropped = ~kept.any(-1, keepdim=True)
    return out + attrs["weight"] * dense * all_dropped


def combine(ctx, attrs, y, weights):
    """sum_j weights[..., j] * y[..., j, :], summed in choice order j = 0, 1, ..."""
    out = weights[..., 0, None] * y[..., 0, :]
    for j in range(1, y.shape[-2]):
        out = out + weights[..., j, None] * y[..., j, :]
    return out


def load_balance_loss(ctx, attrs, scores, indices):
    """weight * E * sum_e (c_e / N) * P_e  (Switch / HF Mixtral convention; = top_k when balanced).

    c_e: tokens whose top-k includes expert e (before capacity drops); P_e: the mean over
    the N = B*S tokens of the router scores normalised to sum to 1 per token.
    ``per_sequence`` (aux.load_balance_scope 'sequence', DeepSeek-V3's sequence-wise loss): c_e, N and
    P_e of each sequence (dim 0) on its own, the loss the mean over the sequences.
    """
    if attrs.get("per_sequence"):
        per_attrs = {**attrs, "per_sequence": False}
        losses = [load_balance_loss(ctx, per_attrs, scores[b : b + 1], indices[b : b + 1]) for b in range(scores.shape[0])]
        return torch.stack(losses).mean()
    experts = attrs["experts"]
    probs = scores / scores.sum(-1, keepdim=True)
    tokens = probs.shape[0] * probs.shape[1]
    mean_prob = probs.reshape(tokens, experts).mean(0)
    counts = torch.nn.functional.one_hot(indices.reshape(-1), experts).sum(0).to(probs.dtype)
    return attrs["weight"] * experts * torch.sum(counts / tokens * mean_prob)


def balance_stats(ctx, attrs, scores, indices):
    """[2, E]: row 0 f_e = c_e / N (c_e as in load_balance_loss), row 1 P_e (mean normalised score).

    ``aux.load_balance_scope: model``: every MoE layer gives these and ``load_balance_pooled``
    makes one loss of their sum.
    """
    experts = attrs["experts"]
    probs = scores / scores.sum(-1, keepdim=True)
    tokens = probs.shape[0] * probs.shape[1]
    counts = torch.nn.functional.one_hot(indices.reshape(-1), experts).sum(0).to(probs.dtype)
    return torch.stack([counts / tokens, probs.reshape(tokens, experts).mean(0)])


def load_balance_pooled(ctx, attrs, stats):
    """weight * E * sum_e (f_e summed over layers / L) * (P_e summed over layers / L): HF's load_balancing_loss_func."""
    layers = attrs["layers"]
    return attrs["weight"] * attrs["experts"] * torch.sum(stats[0] / layers * (stats[1] / layers))


def z_loss(ctx, attrs, logits):
    """weight * mean over tokens of logsumexp(logits)^2 (ST-MoE), on the raw router logits."""
    return attrs["weight"] * torch.logsumexp(logits, dim=-1).pow(2).mean()


def rfft(ctx, attrs, x):
    return torch.fft.rfft(x, dim=1, norm=attrs["norm"])


def irfft(ctx, attrs, spectrum):
    return torch.fft.irfft(spectrum, n=ctx.symbols["S"], dim=1, norm=attrs["norm"])


def complex_to_real(ctx, attrs, spectrum):
    """[B,F,D] complex -> [B,F,2D]: real parts, then imaginary parts."""
    return torch.cat([spectrum.real, spectrum.imag], dim=-1)


def real_to_complex(ctx, attrs, z):
    half = z.shape[-1] // 2
    return torch.complex(z[..., :half].contiguous(), z[..., half:].contiguous())


def band_embed(ctx, attrs, z, table):
    return z + table[: z.shape[1]]


def band_index(ctx, attrs, z):
    """Append the frequency index f / (F - 1) in [0, 1] as one more channel."""
    return snippets.band_index(z)


KERNELS = {
    "noise": noise, "anneal_temperature": anneal_temperature, "band_mask": band_mask, "softmax": softmax, "sigmoid": sigmoid, "sinkhorn": sinkhorn, "token_route": token_route, "topk": topk,
    "renormalize": renormalize, "weight_scale": weight_scale, "router_dropout": router_dropout, "entropy_loss": entropy_loss, "margin_loss": margin_loss,
    "capacity": capacity, "dispatch": dispatch, "expert_ffn": expert_ffn,
    "combine": combine, "fallback_add": fallback_add, "load_balance_loss": load_balance_loss, "z_loss": z_loss,
    "balance_stats": balance_stats, "load_balance_pooled": load_balance_pooled, "rfft": rfft, "irfft": irfft,
    "complex_to_real": complex_to_real, "real_to_complex": real_to_complex, "band_embed": band_embed,
    "band_index": band_index,
}
