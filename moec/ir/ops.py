"""The closed op vocabulary: for each op, its attributes and its shape rule.

A shape rule takes the input types and the attributes and returns the output types, or
raises :class:`ShapeError`. ``infer_shapes`` and the verifier both use these rules, so a
graph whose recorded types disagree with its ops cannot pass verification.

Semantics of every op are in docs/semantics.md; the reference interpreter implements them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from moec.ir.graph import AttrValue, Dim, TensorType


class ShapeError(ValueError):
    """Input types that an op cannot accept."""


Rule = Callable[[Sequence[TensorType], dict[str, AttrValue]], tuple[TensorType, ...]]


@dataclass(frozen=True)
class OpDef:
    name: str
    min_inputs: int
    max_inputs: int
    required: frozenset[str]
    optional: frozenset[str]
    rule: Rule
    fused: bool = False


OPS: dict[str, OpDef] = {}


def op(name: str, inputs: int | tuple[int, int], required: str = "", optional: str = "", fused: bool = False):
    low, high = (inputs, inputs) if isinstance(inputs, int) else inputs

    def register(rule: Rule) -> Rule:
        OPS[name] = OpDef(name, low, high, frozenset(required.split()), frozenset(optional.split()), rule, fused)
        return rule

    return register


def _same(t: TensorType, dtype: str | None = None) -> tuple[TensorType, ...]:
    return (TensorType(t.shape, dtype or t.dtype),)


def _elementwise(types, attrs):
    return _same(types[0])


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ShapeError(message)


def _float(t: TensorType, what: str) -> None:
    _expect(t.dtype == "f32", f"{what} must be f32, got {t}")


def _last(t: TensorType, size: Dim, what: str) -> None:
    _expect(t.rank >= 1 and t.shape[-1] == size, f"{what}: last dim must be {size}, got {t}")


# --- sources ---------------------------------------------------------------------------


@op("input", 0, required="name dtype shape")
def _input(types, attrs):
    return (TensorType(tuple(attrs["shape"]), str(attrs["dtype"])),)


@op("param", 0, required="name shape init std trainable", optional="group values")
def _param(types, attrs):
    shape = tuple(attrs["shape"])
    _expect(all(isinstance(d, int) and d > 0 for d in shape), f"parameter shapes are concrete, got {shape}")
    return (TensorType(shape, "f32"),)


@op("constant", 0, required="value")
def _constant(types, attrs):
    return (TensorType((), "f32"),)


# --- dense -----------------------------------------------------------------------------


@op("embed", 2, optional="padding_idx")
def _embed(types, attrs):
    tokens, table = types
    _expect(tokens.dtype == "i64" and table.rank == 2, f"embed takes i64 ids and a [V,D] table, got {tokens}, {table}")
    return (TensorType(tokens.shape + (table.shape[1],), "f32"),)


@op("linear", (2, 3))
def _linear(types, attrs):
    x, weight = types[0], types[1]
    _float(x, "linear input")
    _expect(weight.rank == 2, f"linear weight must be [out, in], got {weight}")
    _last(x, weight.shape[1], "linear input")
    if len(types) == 3:
        _expect(types[2].shape == (weight.shape[0],), f"linear bias must be [{weight.shape[0]}], got {types[2]}")
    return (TensorType(x.shape[:-1] + (weight.shape[0],), "f32"),)


@op("pos_embed", 2)
def _pos_embed(types, attrs):
    x, table = types
    _expect(x.rank == 3 and table.rank == 2 and table.shape[1] == x.shape[2], f"pos_embed takes [B,S,D] and [L,D], got {x}, {table}")
    return _same(x)


@op("rmsnorm", 2, required="eps")
def _rmsnorm(types, attrs):
    x, weight = types
    _last(x, weight.shape[0], "rmsnorm input")
    return _same(x)


@op("head_rmsnorm", 2, required="eps heads")
def _head_rmsnorm(types, attrs):
    """RMSNorm of each head's slice of [.., heads * head_dim] with one [head_dim] weight."""
    x, weight = types
    _last(x, attrs["heads"] * weight.shape[0], "head_rmsnorm input")
    return _same(x)


@op("layernorm", 3, required="eps")
def _layernorm(types, attrs):
    x, weight, bias = types
    _last(x, weight.shape[0], "layernorm input")
    _expect(bias.shape == weight.shape, f"layernorm bias must match weight, got {bias}")
    return _same(x)


# YaRN (rope.scaling): factor, original, beta_fast, beta_slow, truncate are all set or none; ``scale`` (DeepSeek's mscale)
# replaces YaRN's cos / sin scale. ``interleave``: dims (2i, 2i+1) pair up (HF's rope_interleave), else i and i + head_dim/2.
# ``rotary_dim`` (partial rotary): only each head's first rotary_dim dims rotate, as if head_dim were rotary_dim.
@op("rope", 1, required="heads head_dim theta", optional="factor original beta_fast beta_slow truncate scale interleave rotary_dim")
def _rope(types, attrs):
    (x,) = types
    _last(x, attrs["heads"] * attrs["head_dim"], "rope input")
    rotated = attrs.get("rotary_dim", attrs["head_dim"])
    _expect(rotated % 2 == 0 and 0 < rotated <= attrs["head_dim"], f"rope needs an even rotary_dim within head_dim, got {rotated}")
    return _same(x)


@op("attention", (3, 4), required="heads kv_heads head_dim causal", optional="window")
def _attention(types, attrs):
    """q, k, v [, sinks [heads]]."""
    q, k, v = types[:3]
    if len(types) == 4:
        _expect(types[3].shape == (attrs["heads"],), f"attention sinks must be [{attrs['heads']}], got {types[3]}")
    heads, kv, hd = attrs["heads"], attrs["kv_heads"], attrs["head_dim"]
    _last(q, heads * hd, "attention q")
    _last(k, kv * hd, "attention k")
    _last(v, kv * hd, "attention v")
    _expect(heads % kv == 0, f"heads ({heads}) must be a multiple of kv_heads ({kv})")
    return _same(q)


@op("split", 1, required="sizes heads parts")
def _split(types, attrs):
    """Each head's slice of x [.., heads * sum(sizes)] cut into parts: output i is [.., heads * sizes[i]]; ``parts`` names them."""
    (x,) = types
    sizes, heads = tuple(attrs["sizes"]), attrs["heads"]
    _expect(len(sizes) == len(attrs["parts"]) >= 2, f"split needs a name per part and two parts or more, got {sizes}, {attrs['parts']}")
    _last(x, heads * sum(sizes), "split input")
    return tuple(TensorType(x.shape[:-1] + (heads * size,), x.dtype) for size in sizes)


@op("latent_cache", 2)
def _latent_cache(types, attrs):
    """MLA's decode-cache point: (kv latent, rope key) in and out, the identity in a full forward."""
    kv, k_pe = types
    _expect(kv.shape[:-1] == k_pe.shape[:-1], f"latent_cache takes a latent and a rope key per token, got {kv}, {k_pe}")
    return _same(kv) + _same(k_pe)


@op("mla_attention", 5, required="heads scale")
def _mla_attention(types, attrs):
    """q_nope, q_pe, k_nope [.., H*nope / H*rope / H*nope], k_pe [.., rope] (one key for the heads), v [.., H*v] -> [.., H*v]."""
    q_nope, q_pe, k_nope, k_pe, v = types
    heads = attrs["heads"]
    _expect(q_nope.shape[-1] % heads == 0 and v.shape[-1] % heads == 0, f"mla_attention: q {q_nope} and v {v} must split into {heads} heads")
    _last(k_nope, q_nope.shape[-1], "mla_attention k_nope")
    _last(q_pe, heads * k_pe.shape[-1], "mla_attention q_pe")
    _expect(k_pe.shape[-1] % 2 == 0, f"mla_attention needs an even rope dim, got {k_pe}")
    return _same(v)


op("activation", 1, required="fn")(_elementwise)


@op("glu", 2, required="fn")
def _glu(types, attrs):
    gate, up = types
    _expect(gate.shape == up.shape, f"glu gate and up must match, got {gate}, {up}")
    return _same(gate)


@op("clamped_glu", 2, required="limit alpha")
def _clamped_glu(types, attrs):
    gate, up = types
    _expect(gate.shape == up.shape, f"clamped_glu gate and up must match, got {gate}, {up}")
    return _same(gate)


@op("add", 2)
def _add(types, attrs):
    a, b = types
    _expect(a.shape == b.shape and a.dtype == b.dtype, f"add needs equal types, got {a} and {b}")
    return _same(a)


@op("sigmoid_gate", 2)
def _sigmoid_gate(types, attrs):
    """x * sigmoid(g): x [.., D] scaled by a [.., 1] gate."""
    x, gate = types
    _expect(gate.shape == x.shape[:-1] + (1,), f"sigmoid_gate takes x {x} and a gate of shape [.., 1], got {gate}")
    return _same(x)


@op("select_last", 1)
def _select_last(types, attrs):
    (x,) = types
    _expect(x.rank == 3, f"select_last takes [B,S,D], got {x}")
    return (TensorType((x.shape[0], 1, x.shape[2]), x.dtype),)


@op("shift_tokens", 1, required="steps")
def _shift_tokens(types, attrs):
    """Token ids moved ``steps`` positions left, the last ``steps`` positions 0 (multi-token prediction's inputs)."""
    (tokens,) = types
    _expect(tokens.dtype == "i64" and tokens.rank == 2, f"shift_tokens takes i64 ids [B,S], got {tokens}")
    return _same(tokens)


@op("concat", 2)
def _concat(types, attrs):
    """[.., A] ++ [.., C] -> [.., A+C] along the last dimension."""
    a, c = types
    _float(a, "concat input")
    _expect(a.shape[:-1] == c.shape[:-1], f"concat takes values that differ in the last dimension only, got {a}, {c}")
    last = a.shape[-1] + c.shape[-1] if isinstance(a.shape[-1], int) and isinstance(c.shape[-1], int) else None
    _expect(last is not None, f"concat needs static last dimensions, got {a}, {c}")
    return (TensorType(a.shape[:-1] + (last,), "f32"),)


@op("dynamics", (6, 7), required="dt beta_max velocity_limit")
def _dynamics(types, attrs):
    """INL dynamics: (h, [v], mu, controller_in w/b, controller_out w/b) -> (h', v'); without v, v = 0."""
    h, params = types[0], types[-5:]
    _float(h, "dynamics input")
    if len(types) == 7:
        _expect(types[1].shape == h.shape, f"dynamics velocity must have the input's shape {h}, got {types[1]}")
    d = h.shape[-1]
    mu, w_in, b_in, w_out, b_out = params
    _expect(mu.shape == (d,) and w_in.rank == 2 and w_in.shape[1] == 2 * d and b_in.shape == (w_in.shape[0],)
            and w_out.shape == (3 * d, w_in.shape[0]) and b_out.shape == (3 * d,),
            f"dynamics parameters must be mu [{d}], controller_in [C, {2 * d}] + [C], controller_out [{3 * d}, C] + [{3 * d}], "
            f"got {', '.join(map(str, params))}")
    return _same(h) + _same(h)


# --- routing ---------------------------------------------------------------------------


# Router score ops keep their input's shape: [B,S,E] logits -> [B,S,E] scores.
for _name, _required in (("softmax", "temperature"), ("sigmoid", "temperature"), ("renormalize", ""), ("router_dropout", "p"),
                         ("weight_scale", "factor")):
    op(_name, 1, required=_required)(_elementwise)


def _annealed(types, attrs):
    """x and, optionally, the layer's [3] router.anneal buffer (temperature, noise std, capacity factor)."""
    if len(types) == 2:
        _expect(types[1].shape == (3,), f"the anneal buffer is [3], got {types[1]}")
    return _same(types[0])


op("noise", (1, 2), required="kind std")(_annealed)
op("anneal_temperature", 2)(_annealed)
op("band_mask", 1, required="bands")(_elementwise)  # [B,F,E] logits, -inf outside each bin's group of experts
op("sinkhorn", 1, required="iters tau temperature", optional="topk")(_elementwise)


@op("token_route", 1, required="experts", optional="table")
def _token_route(types, attrs):
    """Token-id routing: i64 ids [B,S] -> one-hot scores [B,S,E] of each id's expert."""
    (ids,) = types
    _expect(ids.dtype == "i64" and ids.rank == 2, f"token_route takes i64 token ids [B,S], got {ids}")
    return (TensorType(ids.shape + (attrs["experts"],), "f32"),)


@op("topk", (1, 2), required="k", optional="groups top_groups")
def _topk(types, attrs):
    """With ``groups`` / ``top_groups`` (group-limited routing): k of the experts in the top_groups best of groups equal groups."""
    scores = types[0]
    _expect(scores.rank == 3, f"topk takes scores [B,S,E], got {scores}")
    _expect(attrs["k"] <= scores.shape[-1], f"k ({attrs['k']}) exceeds experts ({scores.shape[-1]})")
    if "groups" in attrs:
        groups, top_groups, experts = attrs["groups"], attrs["top_groups"], scores.shape[-1]
        _expect(experts % groups == 0 and experts // groups >= 2 and top_groups <= groups
                and attrs["k"] <= top_groups * (experts // groups),
                f"topk: {groups} groups of >= 2 experts, k ({attrs['k']}) <= top_groups ({top_groups}) * group size, got {experts} experts")
    if len(types) == 2:
        _expect(types[1].shape == (scores.shape[-1],), f"selection bias must be [{scores.shape[-1]}], got {types[1]}")
    out = scores.shape[:-1] + (attrs["k"],)
    return TensorType(out, "f32"), TensorType(out, "i64")


@op("capacity", (3, 4), required="factor experts top_k drop_policy", optional="tokens")
def _capacity(types, attrs):
    scores, indices, weights = types[:3]
    _expect(indices.shape == weights.shape and indices.dtype == "i64", f"capacity takes indices and weights of one shape, got {indices}, {weights}")
    _last(scores, attrs["experts"], "capacity scores")
    return TensorType(weights.shape, "f32"), TensorType(weights.shape, "bool")


@op("dispatch", 2)
def _dispatch(types, attrs):
    h, indices = types
    _expect(h.shape[:-1] == indices.shape[:-1], f"dispatch: tokens {h} and indices {indices} disagree")
    return (TensorType(indices.shape + (h.shape[-1],), "f32"),)


@op("expert_ffn", (4, 9), required="experts activation masked bias", optional="limit alpha")
def _expert_ffn(types, attrs):
    x, indices = types[0], types[1]
    weights = types[3:] if attrs["masked"] else types[2:]
    w_up = weights[0]  # [E,H,D], or gated [E,2,H,D]: gate and up in one weight
    _expect(w_up.rank in (3, 4) and w_up.shape[0] == attrs["experts"], f"expert weights are [E,H,D] or [E,2,H,D], got {w_up}")
    _last(x, w_up.shape[-1], "expert_ffn input")
    _expect(x.shape[:-1] == indices.shape, f"expert_ffn: rows {x} and indices {indices} disagree")
    return _same(x)


@op("combine", 2)
def _combine(types, attrs):
    y, weights = types
    _expect(y.shape[:-1] == weights.shape, f"combine: expert outputs {y} and weights {weights} disagree")
    return (TensorType(y.shape[:-2] + (y.shape[-1],), "f32"),)


@op("fallback_add", 3, required="weight")
def _fallback_add(types, attrs):
    """out + weight * dense where a token's every choice was dropped: out, dense [B,S,D], kept [B,S,k] bool."""
    out, dense, kept = types
    _expect(out.shape == dense.shape and kept.shape[:-1] == out.shape[:-1] and kept.dtype == "bool",
            f"fallback_add takes out, dense [B,S,D] and kept [B,S,k], got {out}, {dense}, {kept}")
    return _same(out)


@op("load_balance_loss", 2, required="experts top_k weight", optional="per_sequence")
def _load_balance(types, attrs):
    return (TensorType((), "f32"),)


@op("balance_stats", 2, required="experts")
def _balance_stats(types, attrs):
    """[2, E]: the fraction of tokens routed to each expert, and each expert's mean router probability."""
    scores, indices = types
    _last(scores, attrs["experts"], "balance_stats scores")
    return (TensorType((2, attrs["experts"]), "f32"),)


@op("load_balance_pooled", 1, required="layers experts weight")
def _load_balance_pooled(types, attrs):
    (stats,) = types
    _expect(stats.shape == (2, attrs["experts"]), f"load_balance_pooled takes summed balance stats [2, E], got {stats}")
    return (TensorType((), "f32"),)


@op("z_loss", 1, required="weight")
def _z_loss(types, attrs):
    return (TensorType((), "f32"),)


@op("entropy_loss", 1, required="weight")
def _entropy_loss(types, attrs):
    return (TensorType((), "f32"),)


@op("margin_loss", 1, required="weight")
def _margin_loss(types, attrs):
    return (TensorType((), "f32"),)


# --- spectral --------------------------------------------------------------------------


def bins(seq: Dim) -> Dim:
    """rfft bins of a length-``seq`` signal."""
    return seq // 2 + 1 if isinstance(seq, int) else ("F" if seq == "S" else f"({seq})//2+1")


@op("rfft", 1, required="norm")
def _rfft(types, attrs):
    (x,) = types
    _expect(x.rank == 3 and x.dtype == "f32", f"rfft takes real [B,S,D], got {x}")
    return (TensorType((x.shape[0], bins(x.shape[1]), x.shape[2]), "c64"),)


@op("irfft", 1, required="norm")
def _irfft(types, attrs):
    (x,) = types
    _expect(x.rank == 3 and x.dtype == "c64" and x.shape[1] == "F", f"irfft takes complex [B,F,D], got {x}")
    return (TensorType((x.shape[0], "S", x.shape[2]), "f32"),)


@op("complex_to_real", 1)
def _complex_to_real(types, attrs):
    (x,) = types
    _expect(x.dtype == "c64", f"complex_to_real takes c64, got {x}")
    return (TensorType(x.shape[:-1] + (2 * x.shape[-1],), "f32"),)


@op("real_to_complex", 1)
def _real_to_complex(types, attrs):
    (x,) = types
    _expect(x.dtype == "f32" and x.shape[-1] % 2 == 0, f"real_to_complex takes f32 with an even last dim, got {x}")
    return (TensorType(x.shape[:-1] + (x.shape[-1] // 2,), "c64"),)


@op("band_embed", 2)
def _band_embed(types, attrs):
    z, table = types
    _expect(table.rank == 2 and table.shape[1] == z.shape[-1], f"band table must be [bins, {z.shape[-1]}], got {table}")
    return _same(z)


@op("band_index", 1)
def _band_index(types, attrs):
    (z,) = types
    return (TensorType(z.shape[:-1] + (z.shape[-1] + 1,), "f32"),)


# --- fused -----------------------------------------------------------------------------

# `slots` names the role of each input in order (h, router_in, router.weight, ...); `moe` is
# the layer's typed attributes (moec.moe.MoeAttrs), the same for every step of a spectral MoE.
@op("moe", (4, 32), required="slots moe", fused=True)  # h, router_in, w_gate_up, w_down at the least
def _moe(types, attrs):
    h = types[0]
    _float(h, "moe input")
    _expect(len(attrs["slots"]) == len(types), f"moe has {len(types)} inputs but {len(attrs['slots'])} slots")
    moe = attrs["moe"]
    pooled = (TensorType((2, moe.experts), "f32"),) if moe.aux.pooled else ()  # balance statistics
    return _same(h) + (TensorType((), "f32"),) + pooled


@op("spectral_moe", (4, 32), required="slots moe depth fft_norm band", optional="residual", fused=True)
def _spectral_moe(types, attrs):
    x = types[0]
    _expect(x.rank == 3 and x.dtype == "f32", f"spectral_moe takes real [B,S,D], got {x}")
    _expect(len(attrs["slots"]) == len(types), f"spectral_moe has {len(types)} inputs but {len(attrs['slots'])} slots")
    return _same(x) + (TensorType((), "f32"),)
