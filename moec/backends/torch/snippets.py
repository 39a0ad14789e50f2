"""Helper functions copied verbatim into generated programs (only those a program uses).

They are ordinary, tested functions: the emitter copies their source with
``inspect.getsource``, so what runs in ``model.py`` is exactly what is tested here. Each
must depend only on ``math``, ``torch`` and ``F`` (torch.nn.functional). No data-dependent
Python control flow: every branch is on shapes, dtypes or constants, so that
``torch.compile(fullgraph=True)`` traces them without breaks or recompiles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rotate(x: torch.Tensor, heads: int, head_dim: int, inv_freq: torch.Tensor, scale: float,
           positions: torch.Tensor | None, interleaved: bool = False) -> torch.Tensor:
    """Rotate-half RoPE (HF Llama: dims i and i + head_dim/2 pair up) at 0..S-1, or at ``positions`` [B, S] when decoding.

    ``interleaved`` (DeepSeek, HF's rope_interleave): dims 2i and 2i+1 pair up, and each head comes out as
    [rotated evens, rotated odds] (HF ``apply_rotary_pos_emb_interleave``).
    """
    batch, seq, _ = x.shape
    if positions is None:
        angles = torch.outer(torch.arange(seq, dtype=torch.float32, device=x.device), inv_freq.to(x.device))[None]  # (1, S, hd/2)
    else:
        angles = positions.to(torch.float32)[..., None] * inv_freq.to(x.device)  # (B, S, hd/2)
    xh = x.view(batch, seq, heads, head_dim)
    if interleaved:
        cos = (angles.cos() * scale).to(x.dtype)[:, :, None, :]  # (B, S, 1, hd/2)
        sin = (angles.sin() * scale).to(x.dtype)[:, :, None, :]
        even, odd = xh[..., 0::2], xh[..., 1::2]
        return torch.cat([even * cos - odd * sin, odd * cos + even * sin], -1).reshape(batch, seq, heads * head_dim)
    cos = (torch.cat([angles, angles], -1).cos() * scale).to(x.dtype)[:, :, None, :]  # (B, S, 1, hd)
    sin = (torch.cat([angles, angles], -1).sin() * scale).to(x.dtype)[:, :, None, :]
    rotated = torch.cat([-xh[..., head_dim // 2 :], xh[..., : head_dim // 2]], -1)
    return (xh * cos + rotated * sin).reshape(batch, seq, heads * head_dim)


def rotate_part(x: torch.Tensor, heads: int, head_dim: int, rotary_dim: int, rotate) -> torch.Tensor:
    """Partial rotary: ``rotate`` (a RoPE over heads of rotary_dim) on each head's first rotary_dim dims; the rest pass."""
    xh = x.unflatten(-1, (heads, head_dim))
    part = rotate(xh[..., :rotary_dim].flatten(-2)).unflatten(-1, (heads, rotary_dim))
    return torch.cat([part, xh[..., rotary_dim:]], -1).flatten(-2)


def rope(x: torch.Tensor, heads: int, head_dim: int, theta: float, positions: torch.Tensor | None = None,
         interleaved: bool = False, rotary_dim: int | None = None) -> torch.Tensor:
    """Rotary embedding with inverse frequencies theta^(-2i/head_dim); with ``rotary_dim``, of each head's first
    rotary_dim dims only, at theta^(-2i/rotary_dim) (HF's partial_rotary_factor)."""
    if rotary_dim is not None:
        return rotate_part(x, heads, head_dim, rotary_dim, lambda part: rope(part, heads, rotary_dim, theta, positions, interleaved))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=x.device) / head_dim)
    return rotate(x, heads, head_dim, inv_freq, 1.0, positions, interleaved)


def yarn_frequencies(head_dim: int, theta: float, factor: float, original: int, beta_fast: float, beta_slow: float,
                     truncate: bool) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies and the cos/sin scale (as HF transformers' ``_compute_yarn_parameters``)."""
    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, 0.1 * math.log(factor) + 1.0


def rope_yarn(x: torch.Tensor, heads: int, head_dim: int, theta: float, factor: float, original: int, beta_fast: float,
              beta_slow: float, truncate: bool, positions: torch.Tensor | None = None, interleaved: bool = False,
              scale: float | None = None, rotary_dim: int | None = None) -> torch.Tensor:
    """Rotary embedding with YaRN frequencies; cos and sin are scaled by 0.1 * ln(factor) + 1, or by ``scale`` (DeepSeek's mscale);
    ``rotary_dim``: of each head's first rotary_dim dims only."""
    if rotary_dim is not None:
        return rotate_part(x, heads, head_dim, rotary_dim, lambda part: rope_yarn(
            part, heads, rotary_dim, theta, factor, original, beta_fast, beta_slow, truncate, positions, interleaved, scale))
    inv_freq, yarn_scale = yarn_frequencies(head_dim, theta, factor, original, beta_fast, beta_slow, truncate)
    return rotate(x, heads, head_dim, inv_freq, yarn_scale if scale is None else scale, positions, interleaved)


def split_heads(x: torch.Tensor, heads: int, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Each head's slice of x (B, S, heads * sum(sizes)) cut into parts: (B, S, heads * size) each."""
    parts = x.unflatten(-1, (heads, sum(sizes))).split(list(sizes), dim=-1)
    return tuple(part.flatten(-2) for part in parts)


def _mla_heads(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
               heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, S, nope+rope), k (B, H, L, nope+rope) with the one rope key repeated over the heads, v (B, H, L, v)."""
    batch, seq, _ = q_nope.shape
    length = k_nope.shape[1]
    q = torch.cat([q_nope.view(batch, seq, heads, -1), q_pe.view(batch, seq, heads, -1)], -1).transpose(1, 2)
    k_pe = k_pe.view(batch, length, 1, -1).expand(batch, length, heads, k_pe.shape[-1])
    k = torch.cat([k_nope.view(batch, length, heads, -1), k_pe], -1).transpose(1, 2)
    return q, k, v.view(batch, length, heads, -1).transpose(1, 2)


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor, heads: int,
                  scale: float, positions: torch.Tensor | None = None) -> torch.Tensor:
    """MLA's attention (torch SDPA): each head's query [q_nope, q_pe] against its key [k_nope, k_pe] -> (B, S, H*v).

    Causal over the S keys, or, decoding, over L cached keys: key j is visible to a query at ``positions`` p when j <= p.
    """
    batch, seq, _ = q_nope.shape
    q, k, v = _mla_heads(q_nope, q_pe, k_nope, k_pe, v, heads)
    mask = None if positions is None else (torch.arange(k.shape[2], device=q.device) <= positions[..., None])[:, None]  # (B, 1, S, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=positions is None, scale=scale)
    return out.transpose(1, 2).reshape(batch, seq, -1)


def mla_attention_eager(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
                        heads: int, scale: float, positions: torch.Tensor | None = None) -> torch.Tensor:
    """MLA's attention written out (softmax(q k^T * scale) v, as HF's eager path): kernels.attention 'eager'."""
    batch, seq, _ = q_nope.shape
    q, k, v = _mla_heads(q_nope, q_pe, k_nope, k_pe, v, heads)
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, S, L)
    query_pos = torch.arange(seq, device=q.device)[None, :, None] if positions is None else positions[..., None]  # (B|1, S, 1)
    hidden = torch.arange(k.shape[2], device=q.device) > query_pos
    out = scores.masked_fill(hidden[:, None], float("-inf")).softmax(-1) @ v
    return out.transpose(1, 2).reshape(batch, seq, -1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int, head_dim: int, causal: bool) -> torch.Tensor:
    """Scaled dot-product attention (torch SDPA) with grouped KV heads: (B,S,H*hd) -> (B,S,H*hd)."""
    batch, seq, _ = q.shape
    q = q.view(batch, seq, heads, head_dim).transpose(1, 2)
    k = k.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    v = v.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=heads != kv_heads)
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def attention_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int, head_dim: int, causal: bool) -> torch.Tensor:
    """Attention written out (softmax(q k^T / sqrt(hd)) v, KV heads repeated): kernels.attention 'eager'."""
    batch, seq, _ = q.shape
    q = q.view(batch, seq, heads, head_dim).transpose(1, 2)
    k = k.view(batch, seq, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    v = v.view(batch, seq, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if causal:
        mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def attention_local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                    window: int | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """Causal attention written out, with an optional sliding window and per-head sink logits (GPT-OSS).

    A query at i sees keys j with i - window < j <= i; a sink joins each softmax row and its share is dropped.
    """
    batch, seq, _ = q.shape
    q = q.view(batch, seq, heads, head_dim).transpose(1, 2)
    k = k.view(batch, seq, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    v = v.view(batch, seq, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    pos = torch.arange(seq, device=q.device)
    hidden = pos[None, :] > pos[:, None]  # (S, S) future keys
    if window is not None:
        hidden = hidden | (pos[None, :] <= pos[:, None] - window)
    scores = scores.masked_fill(hidden, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(1, heads, 1, 1).expand(batch, heads, seq, 1)], dim=-1)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        probs = scores.softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    out = probs @ v
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def add_positions(x: torch.Tensor, table: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """x plus the learned position embedding of each token: rows 0..S-1 of ``table``, or ``positions`` [B, S] when decoding."""
    return x + (table[: x.shape[1]] if positions is None else table[positions])


def clamped_glu(gate: torch.Tensor, up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """GPT-OSS's clamped SwiGLU: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)."""
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(gate * alpha))


def sinkhorn(logits: torch.Tensor, iters: int, tau: float, temperature: float, topk: int = 0) -> torch.Tensor:
    """Log-space Sinkhorn over all tokens: rows sum to 1, then columns to N/E, ``iters`` times.

    ``topk`` > 0 restricts each token to its topk highest logits (ties to the lower expert): the
    others get kernel 0. An expert no token has as a candidate keeps a column of zeros.
    """
    log_k = logits / (temperature * tau)  # (N, E)
    tokens, experts = log_k.shape
    empty = None
    if topk:
        candidates = torch.sort(log_k.detach(), dim=-1, descending=True, stable=True).indices[:, :topk]
        allowed = torch.zeros_like(log_k, dtype=torch.bool).scatter(1, candidates, True)
        log_k = log_k.masked_fill(~allowed, float("-inf"))
        empty = ~allowed.any(0, keepdim=True)  # (1, E) experts that are no token's candidate
    row = log_k.new_zeros(tokens, 1)
    col = log_k.new_zeros(1, experts)
    for _ in range(iters):
        row = -torch.logsumexp(log_k + col, dim=1, keepdim=True)
        if empty is None:
            col = math.log(tokens / experts) - torch.logsumexp(log_k + row, dim=0, keepdim=True)
        else:  # an empty column's logsumexp is -inf (inf - inf, NaN gradients): it is left at 0
            lse = torch.logsumexp((log_k + row).masked_fill(empty, 0.0), dim=0, keepdim=True)
            col = math.log(tokens / experts) - lse.masked_fill(empty, 0.0)
    return torch.exp(log_k + row + col)


def router_noise(logits: torch.Tensor, kind: str, std: float, training: bool) -> torch.Tensor:
    """Exploration noise on router logits while training: gaussian (std) or gumbel (scale std)."""
    if not training or kind == "none":
        return logits
    if kind == "gaussian":
        return logits + std * torch.randn_like(logits)
    return logits - std * torch.log(-torch.log(torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)))


def router_dropout(weights: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """While training, each token's best choice (column 0) gets weight 0 with probability p: its second-best only.

    One uniform number per token, drawn in token order (reproducible from the seed).
    """
    if not training:
        return weights
    keep_best = (torch.rand(weights.shape[:-1], device=weights.device) >= p).to(weights.dtype)
    return torch.cat([weights[..., :1] * keep_best.unsqueeze(-1), weights[..., 1:]], dim=-1)


def router_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy of the per-token normalised scores."""
    probs = scores / scores.sum(-1, keepdim=True)
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()


def router_margin(scores: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of p_top1 - p_top2 (per-token normalised scores)."""
    probs = scores / scores.sum(-1, keepdim=True)
    top = torch.topk(probs, 2, dim=-1).values
    return (top[..., 0] - top[..., 1]).mean()


def select_experts(scores: torch.Tensor, top_k: int, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token by (scores + bias), ties to the lower expert; weights are the unbiased scores."""
    select = scores if bias is None else scores + bias
    chosen = torch.sort(select, dim=-1, descending=True, stable=True).indices[:, :top_k]  # (N, k)
    return scores.gather(-1, chosen), chosen


def select_grouped_experts(scores: torch.Tensor, top_k: int, groups: int, top_groups: int,
                           bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k (DeepSeek's n_group / topk_group): the experts in ``groups`` equal groups, a group's score
    the sum of its two best (scores + bias); the top-k of (scores + bias) among the experts of the top_groups best
    groups. Ties to the lower group and expert; weights are the unbiased scores."""
    select = scores if bias is None else scores + bias
    tokens, experts = select.shape
    group_scores = select.view(tokens, groups, experts // groups).topk(2, dim=-1).values.sum(-1)  # (N, groups)
    best = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :top_groups]  # (N, top_groups)
    allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, best, True)  # (N, groups)
    select = select.masked_fill(~allowed.repeat_interleave(experts // groups, dim=1), float("-inf"))
    chosen = torch.sort(select, dim=-1, descending=True, stable=True).indices[:, :top_k]  # (N, k)
    return scores.gather(-1, chosen), chosen


def capacity_of(tokens: int, factor: float, top_k: int, experts: int) -> int:
    """Slots per expert: C = max(1, floor(factor * tokens * top_k / experts))."""
    return max(1, math.floor(factor * tokens * top_k / experts))


def annealed_capacity(factor: torch.Tensor, tokens: int, top_k: int, experts: int) -> torch.Tensor:
    """An annealed capacity: max(1, floor(factor * tokens * top_k / experts)) with ``factor`` a tensor (no recompile as it moves)."""
    return torch.floor(factor * (tokens * top_k / experts)).clamp_min(1)


def capacity_trim(slots: torch.Tensor, limit: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each expert's best ``limit`` of its slots (``capacity_keep``'s, best first); the others become the sentinel ``total``."""
    rank = torch.arange(slots.shape[1], device=slots.device)
    slots = torch.where(rank[None, :] < limit, slots, total)
    kept = torch.zeros(total + 1, dtype=torch.bool, device=slots.device)
    kept = kept.index_put((slots.reshape(-1),), torch.ones_like(slots.reshape(-1), dtype=torch.bool))
    return slots, kept[:total]


def renormalize_kept(weights: torch.Tensor) -> torch.Tensor:
    """drop_policy 'renormalize': a token's kept weights rescaled to sum to 1 (all dropped: stays 0)."""
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), weights)


def capacity_keep(choice_scores: torch.Tensor, flat_expert: torch.Tensor, experts: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert keeps its ``capacity`` highest-scoring (token, choice) slots.

    Returns ``slots`` (E, C): indices into the N*k choices, with ``N*k`` (a sentinel past the
    end) where an expert has fewer than C; and ``kept`` (N*k,) bool. Ties go to the lower slot.
    """
    total = flat_expert.shape[0]
    mine = flat_expert[None, :] == torch.arange(experts, device=flat_expert.device)[:, None]  # (E, N*k)
    ranked = torch.where(mine, choice_scores.detach()[None, :], float("-inf"))
    top = torch.sort(ranked, dim=1, descending=True, stable=True)
    valid = top.values[:, :capacity] > float("-inf")  # (E, C)
    slots = torch.where(valid, top.indices[:, :capacity], total)
    kept = torch.zeros(total + 1, dtype=torch.bool, device=flat_expert.device)
    kept = kept.index_put((slots.reshape(-1),), torch.ones_like(slots.reshape(-1), dtype=torch.bool))
    return slots, kept[:total]


def load_balance_loss(scores: torch.Tensor, counts: torch.Tensor, experts: int) -> torch.Tensor:
    """E * sum_e (c_e / N) * P_e with P_e the mean of the per-token normalised scores."""
    probs = scores / scores.sum(-1, keepdim=True)
    return experts * torch.sum(counts.to(probs.dtype) / scores.shape[0] * probs.mean(0))


def sequence_load_balance_loss(scores: torch.Tensor, chosen: torch.Tensor, batch: int, experts: int) -> torch.Tensor:
    """E * mean over sequences of sum_e (c_e / S) * P_e, c_e and P_e over that sequence's S tokens (DeepSeek-V3's sequence-wise loss)."""
    probs = (scores / scores.sum(-1, keepdim=True)).view(batch, -1, experts)  # (B, S, E)
    picks = chosen.reshape(batch, -1)  # (B, S*k)
    counts = probs.new_zeros(batch, experts).scatter_add_(1, picks, torch.ones_like(picks, dtype=probs.dtype))  # (B, E)
    return experts * torch.sum(counts / probs.shape[1] * probs.mean(1)) / batch


def dft_matrices(seq: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of 2*pi*n*f/S, shape (S, F): the real DFT as two matmuls."""
    n = torch.arange(seq, dtype=torch.float64, device=device)
    f = torch.arange(seq // 2 + 1, dtype=torch.float64, device=device)
    angle = 2 * math.pi * torch.outer(n, f) / seq
    return angle.cos().to(dtype), angle.sin().to(dtype)


def spectral_scales(seq: int, norm: str) -> tuple[float, float]:
    """(forward, inverse) scale factors of torch.fft's ``norm`` modes."""
    if norm == "ortho":
        return 1.0 / math.sqrt(seq), 1.0 / math.sqrt(seq)
    if norm == "forward":
        return 1.0 / seq, 1.0
    return 1.0, 1.0 / seq


def rfft_real(x: torch.Tensor, norm: str, use_dft: bool) -> torch.Tensor:
    """rfft over dim 1 as a real view: (B,S,D) -> (B,F,2D) = [real parts, imaginary parts]."""
    if not use_dft:
        spectrum = torch.fft.rfft(x, dim=1, norm=norm)
        return torch.cat([spectrum.real, spectrum.imag], dim=-1)
    cos, sin = dft_matrices(x.shape[1], x.dtype, x.device)
    scale = spectral_scales(x.shape[1], norm)[0]
    real = torch.einsum("sf,bsd->bfd", cos, x) * scale
    imag = -torch.einsum("sf,bsd->bfd", sin, x) * scale
    return torch.cat([real, imag], dim=-1)


def irfft_real(z: torch.Tensor, seq: int, norm: str, use_dft: bool) -> torch.Tensor:
    """Inverse of ``rfft_real``: (B,F,2D) -> (B,S,D); like irfft, ignores imag at DC and Nyquist."""
    width = z.shape[-1] // 2
    if not use_dft:
        spectrum = torch.complex(z[..., :width].contiguous(), z[..., width:].contiguous())
        return torch.fft.irfft(spectrum, n=seq, dim=1, norm=norm)
    cos, sin = dft_matrices(seq, z.dtype, z.device)
    bins = seq // 2 + 1
    weight = torch.full((bins,), 2.0, dtype=z.dtype, device=z.device)
    weight[0] = 1.0
    if seq % 2 == 0:
        weight[-1] = 1.0
    scale = spectral_scales(seq, norm)[1]
    real = torch.einsum("sf,bfd->bsd", cos * weight, z[..., :width])
    imag = torch.einsum("sf,bfd->bsd", sin * weight, z[..., width:])
    return (real - imag) * scale


def band_index(z: torch.Tensor, first: int = 0, total: int | None = None) -> torch.Tensor:
    """Append the frequency index f / (F - 1) as one more channel: (B,F,C) -> (B,F,C+1). Under context parallelism
    z holds bins ``first`` .. of ``total``."""
    bins, total = z.shape[1], z.shape[1] if total is None else total
    index = torch.arange(first, first + bins, dtype=z.dtype, device=z.device) / max(total - 1, 1)
    return torch.cat([z, index[None, :, None].expand(z.shape[0], bins, 1)], dim=-1)


def make_parameters(device, dtype, trainable: dict, frozen: dict | None = None) -> torch.nn.Module:
    """A module holding uninitialised parameters (and non-trainable buffers) of the given shapes."""
    module = torch.nn.Module()
    for name, shape in trainable.items():
        module.register_parameter(name, torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
    for name, shape in (frozen or {}).items():
        module.register_buffer(name, torch.empty(shape, device=device, dtype=dtype))
    return module


def token_route(ids: torch.Tensor, experts: int, table: tuple[int, ...] = ()) -> torch.Tensor:
    """Token-id routing: one-hot (..., E) scores of expert table[id % len(table)], or id % experts without a table."""
    if table:
        expert = torch.tensor(table, dtype=torch.int64, device=ids.device)[ids % len(table)]
    else:
        expert = ids % experts
    return F.one_hot(expert, experts).float()


def inl_dynamics(h: torch.Tensor, v: torch.Tensor | None, mu: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor,
                 w_out: torch.Tensor, b_out: torch.Tensor, dt: float, beta_max: float, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """INL dynamics (complexity): a controller on [h, v] sets alpha, beta, gate; returns (h', v'). v None: the first layer, v = 0."""
    if v is None:
        v = torch.zeros_like(h)
    alpha, beta, gate = F.linear(F.silu(F.linear(torch.cat([h, v], -1), w_in, b_in)), w_out, b_out).chunk(3, dim=-1)
    v_next = (torch.sigmoid(alpha) * v - F.softplus(beta).clamp(max=beta_max) * (h - mu)).clamp(-limit, limit)
    return h + dt * torch.sigmoid(gate) * v_next, v_next


def band_mask(logits: torch.Tensor, bands: int) -> torch.Tensor:
    """Spectral per-band experts on (B, F, E) logits: bin f routes only among the experts of group floor(f * bands / F)."""
    bins, experts = logits.shape[1], logits.shape[-1]
    group = torch.arange(bins, device=logits.device) * bands // bins  # (F,)
    owner = torch.arange(experts, device=logits.device) // (experts // bands)  # (E,)
    return logits.masked_fill(group[:, None] != owner[None, :], float("-inf"))
