"""Facts about a compiled program: parameter counts, FLOPs per token, memory per device.

Everything is computed from the fused, sharding-annotated graph and the spec, so it works
for full-size models without allocating them.

- Active parameters per token: every parameter, except that an MoE layer's experts count
  ``top_k / experts`` of their weights (embeddings included, as in Mixtral's 12.9B).
- FLOPs per token (forward): 2 x the multiply-adds of every matmul a token passes through
  (a spectral layer's MoE runs on F = S//2+1 bins per sequence, ``depth`` times), plus
  attention's QK^T and AV at ``train.seq_len`` without discounting the causal mask, plus
  ~2.5 S log2 S per channel for each FFT. Training is counted as 3 x forward.
- Memory per device: parameters (precision.params), gradients (same dtype) and AdamW's two
  fp32 moments, divided by the mesh sizes of the axes each tensor is sharded on; with
  pipelining, the stage holding the most. Activations are not included.
"""

from __future__ import annotations

import math
import platform

from moec.ir.graph import Graph, Node
from moec.moe.params import EXPERT_PREFIX, ROUTER_WEIGHT

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def numel(node: Node) -> int:
    return math.prod(node.attr["shape"])


def build_manifest(spec, compiled, versions: dict[str, str], graph: Graph | None = None) -> dict:
    """The manifest of ``compiled`` (its pass log); the figures from ``graph`` (default: its own), the
    fused, annotated graph of the same model, so that disabling a pass does not change them."""
    graph = compiled.graph if graph is None else graph
    total = sum(numel(node) for node in graph.params())
    return {
        "versions": versions | {"python": platform.python_version()},
        "spec": spec_record(spec),
        "passes": [
            {"name": r.name, "ms": round(r.seconds * 1e3, 3), "skipped": r.skipped, "changed": r.changed,
             "nodes": r.nodes, "added": r.added, "removed": r.removed}
            for r in compiled.log
        ],
        "parameters": {"total": total, "active_per_token": active_params(graph), "by_group": params_by_group(graph)},
        "flops_per_token": _flops_record(spec, graph),
        "memory_per_device": memory_per_device(spec, graph),
    }


def spec_record(spec) -> dict:
    import hashlib

    source = spec.source
    text = source.text if source is not None and source.text else None
    if text is None:
        from moec.schema import resolved_yaml

        text = resolved_yaml(spec)
    return {
        "name": spec.name,
        "file": source.file if source is not None else None,
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        # the run is reproducible from the file (its sha256) plus these, applied in order
        "overrides": [override.text for override in getattr(source, "overrides", ())],
        "resolved": spec.model_dump(mode="json"),
    }


def params_by_group(graph: Graph) -> dict[str, int]:
    groups: dict[str, int] = {}
    for node in graph.params():
        group = node.attr.get("group", "rest")
        groups[group] = groups.get(group, 0) + numel(node)
    return dict(sorted(groups.items()))


def _expert_fraction(graph: Graph) -> dict[str, float]:
    """Parameter name -> the fraction of it a token uses (top_k / experts for routed experts)."""
    fraction: dict[str, float] = {}
    for node in graph.nodes:
        if node.op in ("moe", "spectral_moe"):
            for slot, ref in zip(node.attr["slots"], node.inputs):
                if slot.startswith(EXPERT_PREFIX):
                    fraction[ref.node] = node.attr["moe"].top_k / node.attr["moe"].experts
    return fraction


def active_params(graph: Graph) -> int:
    fraction = _expert_fraction(graph)
    return round(sum(numel(node) * fraction.get(node.name, 1.0) for node in graph.params()))


def _rows_per_token(node: Node, seq: int) -> float:
    """Rows of a [B, S', ...] value per input token: 1 for S' = S, 1/S for a pooled [B, 1, ...]."""
    dim = node.types[0].shape[1] if node.types and node.types[0].rank >= 2 else "S"
    return 1.0 if dim == "S" else (1.0 / seq if dim == 1 else 1.0)


def flops_per_token(spec, graph: Graph) -> float:
    seq = spec.train.seq_len
    flops = 0.0
    for node in graph.nodes:
        if node.op == "linear":
            flops += 2 * numel(graph[node.inputs[1].node]) * _rows_per_token(node, seq)
        elif node.op == "attention":
            flops += 4 * seq * node.attr["heads"] * node.attr["head_dim"]
        elif node.op in ("moe", "spectral_moe"):
            flops += _moe_flops(graph, node, seq)
        elif node.op == "dynamics":  # the controller's two matmuls (its last five inputs: mu, W_in, b_in, W_out, b_out)
            flops += 2 * sum(numel(graph[ref.node]) for ref in (node.inputs[-4], node.inputs[-2]))
    return flops


def _moe_flops(graph: Graph, node: Node, seq: int) -> float:
    attrs, moe = node.attr, node.attr["moe"]
    per_slot = {slot: numel(graph[ref.node]) for slot, ref in zip(attrs["slots"], node.inputs) if graph[ref.node].op == "param"}
    experts = sum(size for slot, size in per_slot.items() if slot.startswith(EXPERT_PREFIX + "w"))
    shared = sum(size for slot, size in per_slot.items() if slot.startswith("shared."))
    routed_token = 2 * (per_slot.get(ROUTER_WEIGHT, 0) + experts * moe.top_k / moe.experts + shared)
    if node.op == "moe":
        return routed_token
    bins = seq // 2 + 1
    width = node.types[0].shape[-1]
    fft = 2 * 2.5 * width * math.log2(max(seq, 2))
    return attrs["depth"] * routed_token * bins / seq + fft


def _flops_record(spec, graph: Graph) -> dict:
    forward = flops_per_token(spec, graph)
    return {"seq_len": spec.train.seq_len, "forward": round(forward), "training": round(3 * forward)}


def memory_per_device(spec, graph: Graph) -> dict:
    axes = list(spec.mesh.axes)
    param_bytes = DTYPE_BYTES[spec.schedule.precision.params]
    per_stage: dict[int, list[float]] = {}
    for node in graph.params():
        placement = node.meta_dict.get("placement", ())
        shards = math.prod(spec.mesh.axes[axis] for axis, item in zip(axes, placement) if item.startswith("Shard"))
        elements = numel(node) / shards
        stage = node.meta_dict.get("stage", 0)
        totals = per_stage.setdefault(stage, [0.0, 0.0, 0.0])
        totals[0] += elements * param_bytes
        totals[1] += elements * param_bytes if node.attr["trainable"] else 0.0
        totals[2] += elements * 8 if node.attr["trainable"] else 0.0  # AdamW exp_avg + exp_avg_sq, fp32
    stage = max(per_stage, key=lambda s: sum(per_stage[s]))
    params, grads, optimizer = per_stage[stage]
    total = params + grads + optimizer
    return {
        "mesh": dict(spec.mesh.axes),
        "stage": stage,
        "params_bytes": round(params),
        "grads_bytes": round(grads),
        "optimizer_bytes": round(optimizer),
        "total_bytes": round(total),
        "total_gib": round(total / 2**30, 3),
    }
