"""Parameters and FLOPs of a ``dynamics`` layer."""

from __future__ import annotations

from moec.layers.kind import numel


def dynamics_params(layer, spec) -> int:
    """mu, controller_in (weight, bias), controller_out (weight, bias); no norm (the layer is not wrapped)."""
    d = spec.model.d_model
    return d + (2 * d + 1) * layer.controller_hidden + (layer.controller_hidden + 1) * 3 * d


def dynamics_flops(graph, node, seq: int) -> float:
    """The controller's two matmuls (the node's last five inputs: mu, W_in, b_in, W_out, b_out)."""
    return 2 * sum(numel(graph[ref.node]) for ref in (node.inputs[-4], node.inputs[-2]))
