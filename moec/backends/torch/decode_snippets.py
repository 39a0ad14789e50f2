"""Helper functions of the generated decode path (KV cache), copied verbatim into ``model.py``.

Like ``snippets``: ordinary tested functions, depending only on ``math`` and ``torch``, with no data-dependent Python control flow, so that ``torch.compile`` traces a decode
step as one graph per (input length, key bucket) pair.

Layout: each attention layer's cache is a pair ``(k, v)`` of [B, KV, L, hd] tensors (KV heads
only: grouped-query attention stores ``kv_heads``, not ``heads``); ``positions`` [B, S] holds
the absolute position of every input token, so the rows of a batch may be at different
positions (the server decodes several requests in one step).
"""

from __future__ import annotations

import math

import torch


def attention_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                     cache: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor, bucket: int, window: int | None,
                     sinks: torch.Tensor | None) -> torch.Tensor:
    """Causal attention of new tokens over the KV cache: (B,S,H*hd) -> (B,S,H*hd).

    The new keys and values are written at ``positions`` first; the queries then read the first
    ``bucket`` cache slots (a static length, so one compiled graph serves every position below
    it) and see key j when j <= their position (and, with a window, j > position - window).
    Query heads are grouped over the KV heads (head h reads KV head h // (heads / kv_heads)).
    """
    batch, seq, _ = q.shape
    group = heads // kv_heads
    k_cache, v_cache = cache
    index = positions[:, None, :, None].expand(batch, kv_heads, seq, head_dim)
    k_cache.scatter_(2, index, k.view(batch, seq, kv_heads, head_dim).transpose(1, 2).to(k_cache.dtype))
    v_cache.scatter_(2, index, v.view(batch, seq, kv_heads, head_dim).transpose(1, 2).to(v_cache.dtype))
    keys, values = k_cache[:, :, None, :bucket], v_cache[:, :, None, :bucket]  # (B, KV, 1, L, hd)
    q = q.view(batch, seq, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)  # (B, KV, G, S, hd)
    scores = q @ keys.transpose(-1, -2).to(q.dtype) / math.sqrt(head_dim)  # (B, KV, G, S, L)
    key_pos = torch.arange(bucket, device=q.device)
    query_pos = positions[:, None, None, :, None]  # (B, 1, 1, S, 1)
    hidden = key_pos > query_pos
    if window is not None:
        hidden = hidden | (key_pos <= query_pos - window)
    scores = scores.masked_fill(hidden, float("-inf"))
    if sinks is not None:
        sink = sinks.view(1, kv_heads, group, 1, 1).expand(batch, kv_heads, group, seq, 1).to(scores.dtype)
        scores = torch.cat([scores, sink], dim=-1)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        probs = scores.softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    out = probs @ values.to(probs.dtype)  # (B, KV, G, S, hd)
    return out.permute(0, 3, 1, 2, 4).reshape(batch, seq, heads * head_dim)


def latent_cache(kv: torch.Tensor, k_pe: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
                 bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA's latent cache: this step's latent kv (B,S,r) and rope key (B,S,rope) go in at ``positions``; the first
    ``bucket`` positions of both come out, (B,L,r) and (B,L,rope). The cache is a pair of (B, 1, L, r) and (B, 1, L, rope)."""
    kv_cache, pe_cache = cache
    for new, stored in ((kv, kv_cache), (k_pe, pe_cache)):
        index = positions[:, None, :, None].expand(new.shape[0], 1, new.shape[1], new.shape[2])
        stored.scatter_(2, index, new[:, None].to(stored.dtype))
    return kv_cache[:, 0, :bucket].to(kv.dtype), pe_cache[:, 0, :bucket].to(k_pe.dtype)


def length_bucket(length: int, limit: int, smallest: int = 16) -> int:
    """The power of two >= ``length`` (at least ``smallest``), capped at ``limit``: the static lengths decode compiles for."""
    bucket = smallest
    while bucket < length:
        bucket *= 2
    return min(bucket, limit)
