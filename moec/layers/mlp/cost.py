"""Parameters of an ``mlp`` layer (its FLOPs are those of its ``linear`` nodes)."""

from __future__ import annotations

from moec.layers.fields import GATED_ACTIVATIONS


def ffn_param_count(width: int, hidden: int, activation: str, bias: bool = False) -> int:
    """An FFN's up (and gate, when gated) and down projections, with their biases: dense layers and each expert."""
    gates = 2 if activation in GATED_ACTIVATIONS else 1  # a gated FFN has a gate projection (and bias) too
    return (gates + 1) * width * hidden + ((gates * hidden + width) if bias else 0)


def mlp_params(layer, spec) -> int:
    return ffn_param_count(spec.model.d_model, layer.hidden, layer.activation, layer.bias)
