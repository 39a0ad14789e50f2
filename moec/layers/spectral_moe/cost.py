"""Parameters and FLOPs of a ``spectral_moe`` layer."""

from __future__ import annotations

import math

from moec.layers.moe.cost import moe_param_count, routed_token_flops


def spectral_moe_params(layer, spec) -> int:
    width = 2 * spec.model.d_model  # real and imaginary channels; the band table is shared by the depth steps
    band = (spec.model.max_seq_len // 2 + 1) * width if layer.band == "embedding" else 0
    return band + moe_param_count(layer.moe, width, width + 1 if layer.band == "index_feature" else width)


def spectral_moe_flops(graph, node, seq: int) -> float:
    """The MoE on F = S//2+1 bins per sequence, ``depth`` times, plus ~2.5 S log2 S per channel for each FFT."""
    bins = seq // 2 + 1
    width = node.types[0].shape[-1]
    fft = 2 * 2.5 * width * math.log2(max(seq, 2))
    return node.attr["depth"] * routed_token_flops(graph, node) * bins / seq + fft
