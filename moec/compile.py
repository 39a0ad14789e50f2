"""The public entry points: spec -> ``Program`` -> a live, initialised ``nn.Module``.

This is the top of the pipeline (schema -> passes -> backends); nothing below imports it.
``moec.compile_spec``, ``moec.build_model`` and ``moec.reference_model`` are these functions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from moec.backends.init import init_parameter
from moec.backends.parallel import emit_parallel, parallel_plan
from moec.backends.parallel.float8 import float8_linears
from moec.backends.parallel.plan import support_names
from moec.backends.parallel.tensor import split_kind, tensor_axis, tensor_splits
from moec.backends.reference import ReferenceModel
from moec.backends.torch.decode import decode_support
from moec.backends.torch.emit import emit_program
from moec.backends.torch.loader import load_program
from moec.ir.graph import Graph
from moec.manifest import build_manifest, spec_record
from moec.moe.params import EXPERT_PREFIX
from moec.passes import run_pipeline
from moec.passes.sharding import replicated_kv

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Program:
    spec: object
    graph: Graph  # fused, annotated
    source: str  # model.py
    manifest: dict
    log: tuple
    parallel_source: str = ""  # parallel.py: the DeviceMesh and the FSDP2 plan
    support_source: str = ""  # model_support.py: the helpers model.py imports (torch only)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    def moe_layers(self) -> list[tuple[str, object]]:
        """``(layer name as in MOE_LAYERS, its MoeAttrs)`` for every MoE layer, in forward order."""
        from moec.backends.torch.blocks import moe_layers

        nodes = [node for node in self.graph.nodes if node.op in ("moe", "spectral_moe")]
        return [(name, node.attr["moe"]) for name, node in zip(moe_layers(self.graph), nodes)]


def versions() -> dict[str, str]:
    from moec.version import __version__

    return {"moec": __version__, "torch": torch.__version__}


def compile_spec(spec, disable: tuple[str, ...] = (), kernel_choice=None) -> Program:
    """Spec -> Program with ``.graph`` (fused IR), ``.source`` (model.py) and ``.manifest``.

    ``kernel_choice``: ``kernels.moe: auto`` measured on a device (``moec.bench.kernel_choice.choose_moe_kernels``);
    without it auto is the fixed rule, so the same spec gives the same program everywhere."""
    compiled = run_pipeline(spec, disable=disable)
    kernels = spec.schedule.kernels
    measured = kernel_choice.by_attrs if kernel_choice is not None else {}
    header = _header(spec, compiled, kernels, measured)
    experts = expert_owners(compiled.graph)
    splits = tensor_splits(spec, compiled.graph)
    kv = replicated_kv(spec, compiled.graph) if splits else {}  # nothing split (annotate_sharding disabled): all whole
    plan = parallel_plan(spec, tuple(experts), splits, kv)
    source, support = emit_program(compiled.graph, spec_name=spec.name, header=header, moe_kernel=kernels.moe,
                          spectral_kernel=kernels.spectral_moe, attention_kernel=kernels.attention,
                          expert_parallel=plan.experts is not None and not plan.unsupported, tiles=_tiles(spec),
                          tensor_splits={name: split_kind(name, dim) for name, dim in splits.items()},
                          parallel_names=support_names(plan), context_parallel=plan.context is not None,
                          measured_kernels=measured)
    # Parameters, FLOPs and memory are facts of the model: counted on the full pipeline's graph even
    # when passes were disabled (an unfused graph has no moe node to say which weights are experts).
    facts = compiled.graph if not disable else run_pipeline(spec).graph
    manifest = build_manifest(spec, compiled, versions(), facts)
    if kernel_choice is not None:
        manifest["kernel_choice"] = kernel_choice.record()
    blocks = sum(block.repeat for block in spec.model.blocks)
    stages = tuple(tuple(row["blocks"]) for row in manifest["pipeline_stages"])
    parallel = emit_parallel(spec, plan, blocks, header[:3], experts=max(experts.values(), default=0), stages=stages,
                             cache_input=decode_support(compiled.graph) is None,
                             float8=float8_linears(compiled.graph) if spec.schedule.precision.compute == "fp8" else None)
    return Program(spec=spec, graph=compiled.graph, source=source, manifest=manifest, log=compiled.log, parallel_source=parallel,
                   support_source=support)


def _tiles(spec) -> tuple[int, ...]:
    """schedule.tiles as the (BM, BN, BK, warps, stages) the Triton kernels take; () to autotune."""
    tiles = spec.schedule.tiles
    return () if tiles is None else (tiles.BM, tiles.BN, tiles.BK, tiles.warps, tiles.stages)


def expert_owners(graph: Graph) -> dict[str, int]:
    """Module path of each MoE layer's routed experts (``blocks.0.moe.experts``) -> its expert count."""
    owners = {}
    for node in graph.nodes:
        if node.op in ("moe", "spectral_moe"):
            slot = next(s for s in node.attr["slots"] if s.startswith(EXPERT_PREFIX))  # w_gate_up or w_up
            up = graph[node.inputs[node.attr["slots"].index(slot)].node]
            owners[up.attr["name"].rsplit(".", 1)[0]] = node.attr["moe"].experts
    return owners


def _header(spec, compiled, kernels, measured: dict) -> list[str]:
    record = spec_record(spec)
    v = versions()
    passes = ", ".join(r.name for r in compiled.log if not r.skipped)
    skipped = [r.name for r in compiled.log if r.skipped]
    return [
        f"Generated by moec {v['moec']} from {record['file'] or '<no file>'}; do not edit: change the spec and rebuild.",
        f"spec {spec.name!r}, sha256 {record['sha256']}" + (f"; overrides: {' '.join(record['overrides'])}" if record["overrides"] else ""),
        f"torch {v['torch']}; passes: {passes}" + (f" (skipped: {', '.join(skipped)})" if skipped else ""),
        f"kernels: moe={kernels.moe}{_measured_note(measured)}, spectral_moe={kernels.spectral_moe}, attention={kernels.attention}",
        "",
        "Shapes: B batch, S sequence, F = S//2+1 rfft bins; f32[B,S,64] is float32 of that shape.",
        "Each class names the spec line it comes from and its shapes; ir.txt is the statement-per-node trace.",
    ] + _tensor_parallel_note(spec)


def _measured_note(measured: dict) -> str:
    """auto's measured kernels, in layer order: the program text changes only with the kernel-choice table."""
    kernels = list(dict.fromkeys(measured.values()))
    return f" (measured: {', '.join(kernels)})" if kernels else ""


def _tensor_parallel_note(spec) -> list[str]:
    axis = tensor_axis(spec)
    if axis is None:
        return []
    return [f"Tensor parallel over {axis} ({spec.mesh.axes[axis]}): shapes are the whole model's; a rank holds 1/{spec.mesh.axes[axis]} "
            "of each split group (parallel.py)."]


def build_model(spec, device="cpu", dtype: torch.dtype | None = None, program: Program | None = None,
                path: Path | None = None, weights: Path | None = None, mesh=None) -> torch.nn.Module:
    """The generated model with weights initialised from the spec seed (meta: shapes only).

    ``weights``: a safetensors weights file (or its ``.index.json``), e.g. from ``moec import
    hf``, loaded instead of the seed's values. The source runs from ``path`` (default: the
    cache), where tracebacks will point. With a ``mesh`` (``parallel_module(program).make_mesh(...)``),
    the generated ``parallel.py`` shards it (every rank holds the full model first, so all agree).
    """
    program = program or compile_spec(spec)
    module = load_program(program.source, path, support=program.support_source)
    dtype = dtype or DTYPES[spec.schedule.precision.params]
    model = module.Model(device=device, dtype=dtype)
    if weights is not None:
        from moec.interop.weights import load_weights  # safetensors: the optional [hf] extra

        load_weights(model, weights)
    elif torch.device(device).type != "meta":
        initialise(model, program.graph, spec.train.seed)
    model.program = program
    if mesh is not None:
        model = parallel_module(program).parallelize(model, mesh)
    return model


def parallel_module(program: Program, path: Path | None = None):
    """The generated ``parallel.py`` as a module (``make_mesh``, ``parallelize``, ``MESH_AXES``, ...)."""
    return load_program(program.parallel_source, path, filename="parallel.py", support=program.support_source)


@torch.no_grad()
def initialise(model: torch.nn.Module, graph: Graph, seed: int) -> None:
    """The reference interpreter's initialisation: identical weights in every backend."""
    state = model.state_dict()
    for node in graph.params():
        tensor = state[node.attr["name"]]
        tensor.copy_(init_parameter(node, seed).to(tensor.dtype))


def reference_model(spec, fused: bool = False, device="cpu", disable: tuple[str, ...] = ()) -> ReferenceModel:
    """An ``nn.Module`` interpreting the spec's graph: unfused (default) or after all passes."""
    compiled = run_pipeline(spec, disable=disable)
    graph = compiled.graph if fused else compiled.unfused
    return ReferenceModel(graph, seed=spec.train.seed, device=device)
