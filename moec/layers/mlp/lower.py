"""Lowering of an ``mlp`` layer: a dense feed-forward network whose projections are ``nn.Linear`` s."""

from __future__ import annotations

from dataclasses import replace

from moec.ir.graph import Ref
from moec.layers.kind import Lowering
from moec.moe import ffn, ffn_params


def lower_mlp(cx: Lowering, layer, prefix: str, path: tuple, h: Ref) -> Ref:
    width, hidden, activation, bias = cx.spec.model.d_model, layer.hidden, layer.activation, layer.bias
    decls = [replace(decl, slot=_as_linear(decl.slot)) for decl in ffn_params("", width, hidden, activation, bias, part="", group="rest")]
    params = cx.b.declare(cx.spec, prefix, path, decls)
    return ffn(cx.b, h, list(params.values()), activation, bias, path)


def _as_linear(slot: str) -> str:
    """A dense FFN's projections are ``nn.Linear`` s: ``w_up`` -> ``w_up.weight``, its bias ``b_up`` -> ``w_up.bias``."""
    return f"w_{slot[2:]}.bias" if slot.startswith("b_") else f"{slot}.weight"
