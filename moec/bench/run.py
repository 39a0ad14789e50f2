"""``moec bench SPEC``: time each distinct MoE layer of a spec, forward + backward, side by side.

For each distinct ``moe`` layer (its own spec fields, at the spec's d_model) and each token
count: moec with the spec's kernel (eager and compiled), dense GEMMs with the same active
FLOPs (the limit), and, for top-k SwiGLU layers, HF transformers' grouped_mm experts and a
per-expert loop. Interleaved repetitions in one process; medians, spread, efficiency
(time(dense) / time(layer)) and the ratio to HF.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moec.bench.layers import LayerShape, candidates, step_of
from moec.bench.timing import interleaved, prefixed
from moec.dtypes import DTYPES
from moec.moe.activations import MIXTRAL_ACTIVATION
from moec.layers.moe.spec import ExpertFfn


@dataclass(frozen=True)
class Row:
    layer: str  # "model.blocks[0].layers[1]"
    shape: str
    tokens: int
    name: str
    median_ms: float
    low_ms: float
    high_ms: float
    efficiency: float
    vs_hf: float | None
    peak_mib: float | None


def moe_layers(spec) -> list[tuple[str, str, LayerShape]]:
    """(where, the layer as a YAML flow mapping, its shape at 1 token) per distinct moe layer."""
    seen, out = set(), []
    for b, i, layer in spec.model.layers():
        if layer.kind != "moe":
            continue
        text = json.dumps(layer.model_dump(mode="json", exclude_unset=True), sort_keys=True)
        if text in seen:
            continue
        seen.add(text)
        hidden = layer.expert.hidden or 4 * spec.model.d_model
        out.append((f"model.blocks[{b}].layers[{i}]", text, LayerShape(1, spec.model.d_model, hidden, layer.experts, layer.top_k)))
    return out


def _comparable_to_hf(layer_yaml: str) -> bool:
    """HF Mixtral and the per-expert loop are top-k softmax SwiGLU layers without biases."""
    layer = json.loads(layer_yaml)
    activation = layer.get("expert", {}).get("activation", ExpertFfn.model_fields["activation"].default)
    return (activation == MIXTRAL_ACTIVATION and layer.get("router", {}).get("kind", "topk") == "topk"
            and not layer.get("expert", {}).get("bias", False) and not layer.get("shared_experts"))


def bench_spec(spec, tokens: list[int], reps: int = 7, device: str = "cpu", compiled: bool = True,
               progress: Callable[[str], None] | None = None) -> list[Row]:
    dev = torch.device(device)
    dtype = DTYPES[spec.schedule.precision.params]
    rows: list[Row] = []
    for where, layer_yaml, base in moe_layers(spec):
        for count in tokens:
            shape = LayerShape(count, base.width, base.hidden, base.experts, base.top_k)
            if progress:
                progress(f"{where} at {count} tokens: building")
            comparable = _comparable_to_hf(layer_yaml)
            modules = candidates(shape, dev, dtype, layer_yaml, (spec.schedule.kernels.moe,), compiled=compiled, hf=comparable,
                                 compiled_kernels=(spec.schedule.kernels.moe,))
            if not comparable:
                modules.pop("per-expert loop")
            torch.manual_seed(0)
            x = torch.randn(1, count, shape.width, device=dev, dtype=dtype, requires_grad=True)
            grad = torch.randn(1, count, shape.width, device=dev)
            inner = max(1, min(32, 1024 // count))  # steps per sample: small layers run several
            timings = interleaved({name: step_of(m, x, grad) for name, m in modules.items()}, dev, reps, inner=inner,
                                  progress=prefixed(progress, f"{where} at {count} tokens"))
            by_name = {t.name: t for t in timings}
            dense, hf = by_name["dense (limit)"], by_name.get("hf grouped_mm")
            for t in timings:
                rows.append(Row(where, shape.label(), count, t.name, t.median_s * 1e3, t.low_s * 1e3, t.high_s * 1e3,
                                dense.median_s / t.median_s, t.ratio_to(hf) if hf else None,
                                t.peak_bytes / 2**20 if t.peak_bytes is not None else None))
    return rows

