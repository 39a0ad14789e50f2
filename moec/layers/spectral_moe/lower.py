"""Lowering of a ``spectral_moe`` layer: rfft -> real view -> (z + moe(z)) x depth with shared weights -> complex -> irfft."""

from __future__ import annotations

from dataclasses import replace

from moec.ir.graph import Ref
from moec.layers.kind import Lowering
from moec.moe import decompose_spectral, moe_attrs, moe_params
from moec.moe.params import BAND_TABLE
from moec.passes.builder import init_std


def lower_spectral_moe(cx: Lowering, layer, prefix: str, path: tuple, x: Ref) -> Ref:
    b, spec = cx.b, cx.spec
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
    out, aux = decompose_spectral(b, attrs, x, params, path, depth=layer.depth, fft_norm=layer.fft_norm, band=layer.band,
                                  table=table, residual=layer.residual)
    cx.aux_terms.append(aux)
    return out
