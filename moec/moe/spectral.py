"""``decompose_spectral``: a spectral MoE layer as primitive ops, written once.

rfft over the sequence -> real view [B,F,2D] -> ``depth`` times ``z + moe(z)`` (or ``moe(z)``
without the residual) with one set
of weights, the router seeing the band (a learned table, the index feature, or nothing) ->
complex -> irfft. Lowering builds the unfused graph with it; the reference interpreter runs
it eagerly for a fused ``spectral_moe`` node.
"""

from __future__ import annotations

from typing import Mapping

from moec.ir.graph import Ref
from moec.moe.attrs import MoeAttrs
from moec.moe.decompose import decompose


def decompose_spectral(b, attrs: MoeAttrs, x: Ref, params: Mapping[str, Ref], path: tuple = (), *, depth: int,
                       fft_norm: str, band: str, table: Ref | None = None, residual: bool = True) -> tuple[Ref, Ref]:
    """Returns (output [B,S,D], the steps' aux losses summed); ``table`` is the band embedding."""
    spectrum = b.add("rfft", [x], path, norm=fft_norm)
    z = b.add("complex_to_real", [spectrum], path)
    total = None
    for _ in range(depth):
        if band == "embedding":
            router_in = b.add("band_embed", [z, table], path + ("band",))
        elif band == "index_feature":
            router_in = b.add("band_index", [z], path + ("band",))
        else:
            router_in = z
        y, aux = decompose(b, attrs, z, router_in, params, path + ("moe",))
        z = b.add("add", [z, y], path) if residual else y
        total = aux if total is None else b.add("add", [total, aux], path)
    out = b.add("real_to_complex", [z], path)
    return b.add("irfft", [out], path, norm=fft_norm), total
