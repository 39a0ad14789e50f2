"""Facts about a compiled program: parameter counts, FLOPs per token, memory per device.

Everything is computed from the fused, sharding-annotated graph and the spec, so it works
for full-size models without allocating them.

- Active parameters per token: every parameter, except that an MoE layer's experts count
  ``top_k / experts`` of their weights (embeddings included, as in Mixtral's 12.9B).
- FLOPs per token (forward): ``moec.passes.flops`` (every matmul, attention, FFTs). Training is
  counted as 3 x forward.
- Context parallelism (``sharding.sequence``): the collectives of one forward and the bytes one
  rank sends per sequence (``moec.passes.context_traffic``).
- Memory per device: parameters (precision.params), gradients (same dtype) and AdamW's two
  fp32 moments, divided by the mesh sizes of the axes each tensor is sharded on; with
  pipelining, the stage holding the most. Activations are not included.
"""

from __future__ import annotations

import math
import platform

from moec.dtypes import BYTES
from moec.ir.graph import Graph
from moec.moe.params import EXPERT_PREFIX
from moec.layers.kind import numel
from moec.passes.context_traffic import context_record
from moec.passes.flops import flops_per_token



def build_manifest(spec, compiled, versions: dict[str, str], graph: Graph | None = None) -> dict:
    """The manifest of ``compiled`` (its pass log); the figures from ``graph`` (default: its own), the
    fused, annotated graph of the same model, so that disabling a pass does not change them."""
    graph = compiled.graph if graph is None else graph
    total = sum(numel(node) for node in graph.params())
    context = context_record(spec, graph)  # sharding.sequence: what the cp group exchanges
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
        "pipeline_stages": pipeline_stages(spec, graph),
        **({"context_parallel": context} if context else {}),
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


def _flops_record(spec, graph: Graph) -> dict:
    forward = flops_per_token(spec, graph)
    return {"seq_len": spec.train.seq_len, "forward": round(forward), "training": round(3 * forward)}


def _per_stage_bytes(spec, graph: Graph) -> dict[int, list[float]]:
    """Stage -> [parameter, gradient, optimizer] bytes one device of that stage holds."""
    axes = list(spec.mesh.axes)
    param_bytes = BYTES[spec.schedule.precision.params]
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
    return per_stage


def memory_per_device(spec, graph: Graph) -> dict:
    per_stage = _per_stage_bytes(spec, graph)
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


def pipeline_stages(spec, graph: Graph) -> list[dict]:
    """Per pipeline stage: its blocks, forward FLOPs per token, parameters and bytes per device ([] without PP)."""
    if spec.sharding.pipeline is None or spec.mesh.world_size == 1:
        return []
    from moec.passes.flops import block_flops
    from moec.passes.stages import stage_split

    split = stage_split(spec, graph)
    pre, per_block, post = block_flops(spec, graph, spec.model.num_layers)
    per_stage = _per_stage_bytes(spec, graph)
    params = {}
    for node in graph.params():
        stage = node.meta_dict.get("stage", 0)
        params[stage] = params.get(stage, 0) + numel(node)
    rows = []
    for stage, (first, last) in enumerate(split):
        flops = sum(per_block[first:last + 1]) + (pre if stage == 0 else 0.0) + (post if stage == len(split) - 1 else 0.0)
        rows.append({"stage": stage, "blocks": [first, last], "forward_flops_per_token": round(flops),
                     "parameters": params.get(stage, 0), "bytes_per_device": round(sum(per_stage.get(stage, [0.0])))})
    return rows
