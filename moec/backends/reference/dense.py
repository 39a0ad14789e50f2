"""Reference kernels for the dense ops: plain eager PyTorch, written for clarity.

Each kernel takes ``(ctx, attrs, *inputs)`` and returns a tensor or a tuple of tensors.
``ctx`` carries the symbol values (``B``, ``S``) and whether the model is training.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from moec.backends.torch import snippets

def embed(ctx, attrs, tokens, table):
    """Rows of ``table``; the ``padding_idx`` row (when set) gets no gradient."""
    return F.embedding(tokens, table, padding_idx=attrs.get("padding_idx"))


def linear(ctx, attrs, x, weight, bias=None):
    return F.linear(x, weight, bias)


def pos_embed(ctx, attrs, x, table):
    return x + table[: x.shape[1]]


def rmsnorm(ctx, attrs, x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + attrs["eps"]) * weight


def head_rmsnorm(ctx, attrs, x, weight):
    """rmsnorm of each head's [head_dim] slice, one weight shared by the heads (Qwen3's q_norm / k_norm)."""
    heads = x.view(*x.shape[:-1], attrs["heads"], weight.shape[0])
    return rmsnorm(ctx, attrs, heads, weight).reshape(x.shape)


def sigmoid_gate(ctx, attrs, x, gate):
    return x * torch.sigmoid(gate)


def layernorm(ctx, attrs, x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, attrs["eps"])


def rope(ctx, attrs, x):
    """Rotary embedding, rotate-half convention (as HF Llama): pairs (i, i + head_dim/2).

    ``interleave`` (HF's rope_interleave): pairs (2i, 2i+1), written here as a de-interleave of each head
    ([evens, odds]) followed by the rotate-half rotation, which is what HF's interleaved RoPE computes."""
    heads, head_dim, theta = attrs["heads"], attrs["head_dim"], attrs["theta"]
    if attrs.get("rotary_dim") is not None:  # partial rotary: each head's first rotary_dim dims, as a RoPE of that size
        whole = {key: value for key, value in attrs.items() if key != "rotary_dim"} | {"head_dim": attrs["rotary_dim"]}
        return snippets.rotate_part(x, heads, head_dim, attrs["rotary_dim"], lambda part: rope(ctx, whole, part))
    batch, seq, _ = x.shape
    if attrs.get("interleave"):
        xh = x.view(batch, seq, heads, head_dim)
        x = torch.cat([xh[..., 0::2], xh[..., 1::2]], -1).reshape(batch, seq, heads * head_dim)
    if "factor" in attrs:  # YaRN
        return snippets.rope_yarn(x, heads, head_dim, theta, attrs["factor"], attrs["original"], attrs["beta_fast"],
                                  attrs["beta_slow"], attrs["truncate"], scale=attrs.get("scale"))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=x.device) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32, device=x.device), inv_freq)  # [S, hd/2]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    xh = x.view(batch, seq, heads, head_dim)
    x1, x2 = xh[..., : head_dim // 2], xh[..., head_dim // 2 :]
    rotated = torch.cat([-x2, x1], -1)
    return (xh * cos[:, None, :] + rotated * sin[:, None, :]).reshape(batch, seq, heads * head_dim)


def attention(ctx, attrs, q, k, v, sinks=None):
    """Scaled dot-product attention with grouped KV heads and an optional causal mask, written out."""
    if sinks is not None or attrs.get("window") is not None:
        return snippets.attention_local(q, k, v, attrs["heads"], attrs["kv_heads"], attrs["head_dim"], attrs.get("window"), sinks)
    return snippets.attention_eager(q, k, v, attrs["heads"], attrs["kv_heads"], attrs["head_dim"], attrs["causal"])


def split(ctx, attrs, x):
    """Each head's slice cut into ``sizes`` parts: [.., heads * sum(sizes)] -> one [.., heads * size] per part."""
    heads, sizes = attrs["heads"], list(attrs["sizes"])
    parts = x.reshape(*x.shape[:-1], heads, sum(sizes)).split(sizes, dim=-1)
    return tuple(part.reshape(*x.shape[:-1], -1) for part in parts)


def latent_cache(ctx, attrs, kv, k_pe):
    """MLA's decode-cache point: the identity in a full forward (the reference does not decode)."""
    return kv, k_pe


def mla_attention(ctx, attrs, q_nope, q_pe, k_nope, k_pe, v):
    """Causal softmax(q kᵀ · scale) v per head, q = [q_nope, q_pe], k = [k_nope, k_pe] with one k_pe for every head."""
    heads, (batch, seq, _) = attrs["heads"], q_nope.shape
    q = torch.cat([q_nope.view(batch, seq, heads, -1), q_pe.view(batch, seq, heads, -1)], -1).transpose(1, 2)
    k_pe = k_pe.view(batch, seq, 1, -1).repeat(1, 1, heads, 1)
    k = torch.cat([k_nope.view(batch, seq, heads, -1), k_pe], -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * attrs["scale"]
    future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    out = scores.masked_fill(future, float("-inf")).softmax(-1) @ v.view(batch, seq, heads, -1).transpose(1, 2)
    return out.transpose(1, 2).reshape(batch, seq, -1)


def activation(ctx, attrs, x):
    """``attrs["fn"]`` names a torch.nn.functional activation (moec.moe.ACTIVATIONS' ``fn``)."""
    return getattr(F, attrs["fn"])(x)


def glu(ctx, attrs, gate, up):
    return getattr(F, attrs["fn"])(gate) * up


def clamped_glu(ctx, attrs, gate, up):
    return snippets.clamped_glu(gate, up, attrs["limit"], attrs["alpha"])


def add(ctx, attrs, a, b):
    return a + b


def select_last(ctx, attrs, x):
    return x[:, -1:, :]


def shift_tokens(ctx, attrs, tokens):
    """tokens[:, steps:] padded with id 0 at the end: position i holds token i+steps (Megatron's roll, zero-filled)."""
    return F.pad(tokens[:, attrs["steps"]:], (0, attrs["steps"]))


def concat(ctx, attrs, a, c):
    return torch.cat([a, c], dim=-1)


def dynamics(ctx, attrs, h, *rest):
    """INL dynamics: (h', v') from h and the velocity v (0 when not given), written step by step.

    c = silu([h, v] W_inᵀ + b_in) W_outᵀ + b_out, split into three [D] parts (alpha, beta, gate);
    v' = clamp(sigmoid(a) v - min(softplus(b), beta_max) (h - mu), ±velocity_limit); h' = h + dt sigmoid(g) v'.
    """
    v = rest[0] if len(rest) == 6 else torch.zeros_like(h)
    mu, w_in, b_in, w_out, b_out = rest[-5:]
    control = F.linear(F.silu(F.linear(torch.cat([h, v], dim=-1), w_in, b_in)), w_out, b_out)
    width = h.shape[-1]
    alpha = torch.sigmoid(control[..., :width])
    beta = torch.clamp(F.softplus(control[..., width : 2 * width]), max=attrs["beta_max"])
    gate = torch.sigmoid(control[..., 2 * width :])
    limit = attrs["velocity_limit"]
    v_next = torch.clamp(alpha * v - beta * (h - mu), -limit, limit)
    return h + attrs["dt"] * gate * v_next, v_next


def constant(ctx, attrs):
    return torch.tensor(attrs["value"], dtype=torch.float32, device=ctx.device)


KERNELS = {
    "embed": embed, "linear": linear, "pos_embed": pos_embed, "rmsnorm": rmsnorm, "layernorm": layernorm,
    "head_rmsnorm": head_rmsnorm, "sigmoid_gate": sigmoid_gate, "rope": rope, "attention": attention, "activation": activation, "glu": glu, "clamped_glu": clamped_glu, "add": add,
    "select_last": select_last, "shift_tokens": shift_tokens, "concat": concat, "constant": constant, "dynamics": dynamics, "split": split, "latent_cache": latent_cache,
    "mla_attention": mla_attention,
}
