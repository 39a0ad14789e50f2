"""FLOPs per token of each node of a fused graph: one home for the manifest and the pipeline split.

2 x the multiply-adds of every matmul a token passes through; the ops of a layer kind (attention,
moe, spectral_moe, dynamics) are costed by the kind (``moec/layers/<kind>/cost.py``), attention's
at ``train.seq_len``.
"""

from __future__ import annotations

from moec.ir.graph import Graph, Node
from moec.ir.names import block_of
from moec.layers import LAYER_KINDS
from moec.layers.kind import numel

# The ops a layer kind costs itself (moec/layers/<kind>/cost.py); every other op but ``linear`` is free.
_KIND_FLOPS = {op: flops for kind in LAYER_KINDS.values() for op, flops in kind.flops.items()}


def node_flops(graph: Graph, node: Node, seq: int) -> float:
    if node.op == "linear":
        return 2 * numel(graph[node.inputs[1].node]) * _rows_per_token(node, seq)
    if node.op in _KIND_FLOPS:
        return _KIND_FLOPS[node.op](graph, node, seq)
    return 0.0


def flops_per_token(spec, graph: Graph) -> float:
    return sum(node_flops(graph, node, spec.train.seq_len) for node in graph.nodes)


def block_flops(spec, graph: Graph, blocks: int) -> tuple[float, list[float], float]:
    """Forward FLOPs per token before the first block (embeddings), in each block, and after the last
    (final norm, head). A node belongs to the block of its parameters; one without parameters (attention,
    adds) to the block of the node before it; root parameters after a block start the epilogue."""
    pre, per_block, post = 0.0, [0.0] * blocks, 0.0
    current: int | None = None  # None: the prologue until a block starts, then the epilogue
    started = False
    for node in graph.nodes:
        if node.op in ("param", "input"):
            continue
        params = [graph[ref.node].attr["name"] for ref in node.inputs if graph[ref.node].op == "param"]
        found = [b for b in map(block_of, params) if b is not None]
        if found:
            current, started = max(found), True
        elif params and started:
            current = None  # a root parameter after the blocks: the epilogue
        cost = node_flops(graph, node, spec.train.seq_len)
        if current is not None:
            per_block[current] += cost
        elif started:
            post += cost
        else:
            pre += cost
    return pre, per_block, post


def _rows_per_token(node: Node, seq: int) -> float:
    """Rows of a [B, S', ...] value per input token: 1 for S' = S, 1/S for a pooled [B, 1, ...]."""
    dim = node.types[0].shape[1] if node.types and node.types[0].rank >= 2 else "S"
    return 1.0 if dim == "S" else (1.0 / seq if dim == 1 else 1.0)
