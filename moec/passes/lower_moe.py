"""Lowering of feed-forward, MoE and spectral MoE layers: parameters, then the shared decomposition.

The primitive ops an MoE becomes are written once, in ``moec.moe.decompose`` (which
``fuse_moe`` and the reference interpreter use too); this module only creates the
parameters from the layer's spec and calls it.
"""

from __future__ import annotations

from dataclasses import replace

from moec.ir.graph import Ref
from moec.moe import decompose, decompose_spectral, ffn, ffn_params, moe_attrs, moe_params
from moec.moe.params import BAND_TABLE
from moec.moe.routers import ROUTERS
from moec.passes.builder import GraphBuilder, init_std


def lower_ffn(b: GraphBuilder, spec, h: Ref, prefix: str, path: tuple, width: int, hidden: int, activation: str,
              bias: bool) -> Ref:
    decls = [replace(decl, slot=_as_linear(decl.slot)) for decl in ffn_params("", width, hidden, activation, bias, part="", group="rest")]
    params = b.declare(spec, prefix, path, decls)
    return ffn(b, h, list(params.values()), activation, bias, path)


def _as_linear(slot: str) -> str:
    """A dense FFN's projections are ``nn.Linear`` s: ``w_up`` -> ``w_up.weight``, its bias ``b_up`` -> ``w_up.bias``."""
    return f"w_{slot[2:]}.bias" if slot.startswith("b_") else f"{slot}.weight"


def lower_moe(b: GraphBuilder, spec, layer, h: Ref, prefix: str, path: tuple) -> tuple[Ref, ...]:
    """A token-routed MoE layer on ``h`` [.., d_model]; returns (output, weighted aux loss[, balance statistics])."""
    attrs, width = moe_attrs(layer), spec.model.d_model
    shared = layer.shared_experts
    decls = moe_params(attrs, width, width, layer.expert.hidden, shared.count * shared.hidden if shared else 0)
    params = b.declare(spec, prefix, path, decls)
    router_in = h if ROUTERS[attrs.router.kind].learned else b.input_ref("tokens")  # token_id routes by the input ids
    return decompose(b, attrs, h, router_in, params, path)


def lower_spectral_moe(b: GraphBuilder, spec, layer, x: Ref, prefix: str, path: tuple) -> tuple[Ref, Ref]:
    """rfft -> real view -> (z + moe(z)) x depth with shared weights -> complex -> irfft."""
    cfg, width = layer.moe, 2 * spec.model.d_model
    attrs = moe_attrs(cfg)
    if layer.bands:  # per-band experts: the router of the spectral tokens knows the bands
        attrs = replace(attrs, router=replace(attrs.router, bands=layer.bands))
    table = None
    if layer.band == "embedding":
        bins = spec.model.max_seq_len // 2 + 1
        table = b.param(f"{prefix}.{BAND_TABLE}", (bins, width), path + ("band",), std=init_std(spec), group="router")
    router_width = width + 1 if layer.band == "index_feature" else width
    shared = cfg.shared_experts
    decls = moe_params(attrs, width, router_width, cfg.expert.hidden, shared.count * shared.hidden if shared else 0)
    params = b.declare(spec, f"{prefix}.moe", path + ("moe",), decls)
    return decompose_spectral(b, attrs, x, params, path, depth=layer.depth, fft_norm=layer.fft_norm, band=layer.band, table=table,
                              residual=layer.residual)
