"""The parameters of an MoE layer: their slot names, shapes, initialisation and groups.

A slot is a parameter's role in the layer and the suffix of its name
(``blocks.3.moe.experts.w_up`` fills slot ``experts.w_up``). The fused ``moe`` node lists its
inputs by slot (``h``, ``router_in``, then :func:`moe_slots` in order); lowering creates the
parameters from :func:`moe_params`. Weights are torch-style ``[out, in]``, experts ``[E, out, in]``.

Gated routed experts (swiglu, geglu, reglu, clamped_swiglu) keep gate and up in one weight,
``experts.w_gate_up`` ``[E, 2, H, D]`` (gate first), and one bias ``experts.b_gate_up`` ``[E, 2, H]``:
its ``flatten(1, 2)`` is HF transformers v5's ``gate_up_proj`` ``[E, 2H, D]`` (same bytes, a view), the
one grouped GEMM's weight. The separate ``2`` dim lets tensor parallelism split each expert's hidden
size with torch's plain ``Shard(2)`` (every rank keeps its gate rows and the matching up rows; a
``Shard(1)`` of ``[E, 2H, D]`` would hand one rank all the gate rows, and DCP writes strided shards
wrongly), and keeps each half's init fans those of one ``[H, D]`` matrix. Shared experts and the
dense fallback are single FFNs and keep ``w_up`` / ``w_gate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from moec.moe.activations import is_gated
from moec.moe.anneal import ANNEAL, anneal_values
from moec.moe.attrs import MoeAttrs
from moec.moe.routers import ROUTERS

ROUTER_WEIGHT = "router.weight"
ROUTER_BIAS = "router.bias"
ROUTER_NORM_WEIGHT = "router.norm.weight"  # router.norm: rmsnorm | layernorm
ROUTER_NORM_BIAS = "router.norm.bias"  # router.norm: layernorm
SELECTION_BIAS = "router.selection_bias"
EXPERT_PREFIX = "experts."
FALLBACK_PREFIX = "fallback."  # capacity.fallback 'dense': one expert-shaped FFN
SHARED_GATE = "shared_gate.weight"  # [1, width]: the shared experts' sigmoid gate
BAND_TABLE = "band.weight"  # spectral MoE: the learned band embedding


@dataclass(frozen=True)
class ParamDecl:
    slot: str
    shape: tuple[int, ...]
    part: str  # the spec key under the layer it comes from: router | expert | shared_experts | "" (the layer)
    group: str  # optimiser group (moec.train.optim)
    init: str = "normal"  # normal | zeros | ones | values | an expert init scheme (init_of)
    values: tuple[float, ...] = ()  # init 'values': the initial contents
    output_projection: bool = False  # std scaled by depth (writes into the residual stream)
    trainable: bool = True


def ffn_slots(prefix: str, activation: str, bias: bool, fused: bool = False) -> tuple[str, ...]:
    """``w_up [, w_gate], w_down [, b_up [, b_gate], b_down]`` under ``prefix``; ``fused`` (the routed experts) and
    gated: ``w_gate_up, w_down [, b_gate_up, b_down]``."""
    gated = is_gated(activation)
    if gated and fused:
        names = ["w_gate_up", "w_down"] + (["b_gate_up", "b_down"] if bias else [])
    else:
        names = ["w_up"] + (["w_gate"] if gated else []) + ["w_down"]
        names += (["b_up"] + (["b_gate"] if gated else []) + ["b_down"]) if bias else []
    return tuple(f"{prefix}{name}" for name in names)


def expert_slots(activation: str, bias: bool) -> tuple[str, ...]:
    """The routed experts' slots under ``experts.`` (gate and up fused when gated)."""
    return ffn_slots(EXPERT_PREFIX, activation, bias, fused=True)


def moe_slots(attrs: MoeAttrs) -> tuple[str, ...]:
    """The parameter slots of an MoE layer, in the fused node's input order."""
    slots = [ROUTER_WEIGHT] if ROUTERS[attrs.router.kind].learned else []  # token_id: no router weight
    slots += ([ROUTER_BIAS] if attrs.router.bias else []) + router_norm_slots(attrs)
    slots += [SELECTION_BIAS] if ROUTERS[attrs.router.kind].selection_bias else []
    slots += expert_slots(attrs.expert.activation, attrs.expert.bias)
    if attrs.shared:
        slots += ffn_slots("shared.", attrs.expert.activation, False)
    if attrs.shared_gate:
        slots.append(SHARED_GATE)
    if attrs.capacity.fallback_weight:
        slots += ffn_slots(FALLBACK_PREFIX, attrs.expert.activation, attrs.expert.bias)
    if attrs.anneal:
        slots.append(ANNEAL)
    return tuple(slots)


EXPERT_INITS = ("xavier_uniform", "xavier_normal", "scaled_xavier", "scaled_kaiming")  # the `m` library's schemes


def init_of(scheme: str, shape: tuple[int, ...], layers: int) -> tuple[str, float]:
    """An expert init scheme as (distribution, scale): ('uniform', bound) or ('normal', std).

    Fans are those of one expert's [out, in] matrix (the leading E is not a fan).
    """
    fan_out, fan_in = shape[-2], shape[-1]
    if scheme == "xavier_uniform":
        return "uniform", math.sqrt(6.0 / (fan_in + fan_out))
    if scheme == "xavier_normal":
        return "normal", math.sqrt(2.0 / (fan_in + fan_out))
    if scheme == "scaled_xavier":
        return "normal", 0.02 / math.sqrt(2 * layers)
    assert scheme == "scaled_kaiming", scheme
    return "normal", math.sqrt(2.0 / fan_in) / math.sqrt(2 * layers)


def router_norm_slots(attrs: MoeAttrs) -> list[str]:
    return {"none": [], "rmsnorm": [ROUTER_NORM_WEIGHT], "layernorm": [ROUTER_NORM_WEIGHT, ROUTER_NORM_BIAS]}[attrs.router.norm]


def ffn_params(prefix: str, width: int, hidden: int, activation: str, bias: bool, part: str, group: str,
               experts: int | None = None) -> list[ParamDecl]:
    """An FFN's weights (``experts`` of them stacked when given, gate and up fused then); biases go to the ``bias`` group."""
    lead = (experts,) if experts else ()
    shapes = {"w_up": (hidden, width), "w_gate": (hidden, width), "w_down": (width, hidden), "b_up": (hidden,), "b_gate": (hidden,),
              "b_down": (width,), "w_gate_up": (2, hidden, width), "b_gate_up": (2, hidden)}
    decls = []
    for name in ffn_slots("", activation, bias, fused=bool(experts)):
        is_bias = name.startswith("b_")
        decls.append(ParamDecl(prefix + name, lead + shapes[name], part, "bias" if is_bias else group,
                               init="zeros" if is_bias else "normal", output_projection=name == "w_down"))
    return decls


def moe_params(attrs: MoeAttrs, width: int, router_width: int, hidden: int, shared_hidden: int = 0) -> list[ParamDecl]:
    """Declarations of :func:`moe_slots`: shapes for experts of ``hidden`` on tokens of ``width``."""
    E = attrs.experts
    decls = [ParamDecl(ROUTER_WEIGHT, (E, router_width), "router", "router")] if ROUTERS[attrs.router.kind].learned else []
    if attrs.router.bias:
        decls.append(ParamDecl(ROUTER_BIAS, (E,), "router", "bias", init="zeros"))
    for slot in router_norm_slots(attrs):
        decls.append(ParamDecl(slot, (router_width,), "router", "norm", init="ones" if slot == ROUTER_NORM_WEIGHT else "zeros"))
    if ROUTERS[attrs.router.kind].selection_bias:
        decls.append(ParamDecl(SELECTION_BIAS, (E,), "router", "router", init="zeros", trainable=False))
    experts = ffn_params(EXPERT_PREFIX, width, hidden, attrs.expert.activation, attrs.expert.bias, "expert", "experts", E)
    decls += [replace(d, init=attrs.expert.init) if d.init == "normal" and attrs.expert.init != "normal" else d for d in experts]
    if attrs.shared:
        # Shared experts of hidden H x count are one FFN of hidden count * H (their outputs add up).
        decls += ffn_params("shared.", width, shared_hidden, attrs.expert.activation, False, "shared_experts", "rest")
    if attrs.shared_gate:
        decls.append(ParamDecl(SHARED_GATE, (1, width), "shared_experts", "rest"))
    if attrs.capacity.fallback_weight:
        decls += ffn_params(FALLBACK_PREFIX, width, hidden, attrs.expert.activation, attrs.expert.bias, "capacity", "rest")
    if attrs.anneal:
        values = tuple(anneal_values(attrs.anneal, (attrs.router.temperature, attrs.router.noise_std, attrs.capacity.factor), 0))
        decls.append(ParamDecl(ANNEAL, (3,), "router", "router", init="values", values=values, trainable=False))
    assert tuple(d.slot for d in decls) == moe_slots(attrs)
    return decls
