"""FLOPs per token of each node of a fused graph: one home for the manifest and the pipeline split.

2 x the multiply-adds of every matmul a token passes through (a spectral layer's MoE runs on
F = S//2+1 bins per sequence, ``depth`` times), plus attention's QK^T and AV at ``train.seq_len``
without discounting the causal mask, plus ~2.5 S log2 S per channel for each FFT.
"""

from __future__ import annotations

import math

from moec.ir.graph import Graph, Node
from moec.ir.names import block_of
from moec.moe.params import EXPERT_PREFIX, ROUTER_WEIGHT



def numel(node: Node) -> int:
    return math.prod(node.attr["shape"])


def node_flops(graph: Graph, node: Node, seq: int) -> float:
    if node.op == "linear":
        return 2 * numel(graph[node.inputs[1].node]) * _rows_per_token(node, seq)
    if node.op == "attention":
        return 4 * seq * node.attr["heads"] * node.attr["head_dim"]
    if node.op in ("moe", "spectral_moe"):
        return _moe_flops(graph, node, seq)
    if node.op == "dynamics":  # the controller's two matmuls (its last five inputs: mu, W_in, b_in, W_out, b_out)
        return 2 * sum(numel(graph[ref.node]) for ref in (node.inputs[-4], node.inputs[-2]))
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


def _moe_flops(graph: Graph, node: Node, seq: int) -> float:
    attrs, moe = node.attr, node.attr["moe"]
    per_slot = {slot: numel(graph[ref.node]) for slot, ref in zip(attrs["slots"], node.inputs) if graph[ref.node].op == "param"}
    experts = sum(size for slot, size in per_slot.items() if slot.startswith(EXPERT_PREFIX + "w"))
    shared = sum(size for slot, size in per_slot.items() if slot.startswith("shared."))
    routed_token = 2 * (per_slot.get(ROUTER_WEIGHT, 0) + experts * moe.top_k / moe.experts + shared)  # token_id: no router weight
    if node.op == "moe":
        return routed_token
    bins = seq // 2 + 1
    width = node.types[0].shape[-1]
    fft = 2 * 2.5 * width * math.log2(max(seq, 2))
    return attrs["depth"] * routed_token * bins / seq + fft
