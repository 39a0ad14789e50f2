"""The parallel plan of a spec, and the readable ``parallel.py`` that applies it.

Data parallelism runs on PyTorch's own engines. Axes in ``sharding.fsdp`` shard parameters,
gradients and optimizer state with FSDP2 (``fully_shard`` on every block, then the root:
embeddings, final norm, head); a batch axis plus an FSDP axis is HSDP (``fully_shard`` on the
2-D mesh). Batch axes that are not FSDP axes replicate the model with DDP (the composable
``replicate``, which keeps the module tree): FSDP2's own ``replicate`` does not work with
DCP's state-dict API in torch 2.13, and DDP's plain tensors reshard to any data-parallel size.
Tensor, pipeline, context and expert parallelism are not executed yet: ``unsupported``
names what a spec asks for that this plan cannot run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DTYPE_NAMES = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}


@dataclass(frozen=True)
class ParallelPlan:
    axes: dict[str, int]  # the mesh, in spec order
    replicate: tuple[str, ...]  # batch axes that replicate parameters (plain data parallel)
    shard: tuple[str, ...]  # batch axes that shard them (FSDP)
    param_dtype: str
    reduce_dtype: str
    unsupported: tuple[str, ...]  # what the spec asks for that this plan cannot run yet

    @property
    def world_size(self) -> int:
        return math.prod(self.axes.values())

    @property
    def data_parallel(self) -> tuple[str, ...]:
        return self.replicate + self.shard


def parallel_plan(spec) -> ParallelPlan:
    sharding, mesh = spec.sharding, spec.mesh.axes
    active = {axis for axis, size in mesh.items() if size > 1}
    shard = tuple(axis for axis in sharding.fsdp if axis in active)
    replicate = tuple(axis for axis in sharding.batch if axis in active and axis not in shard)
    unsupported = []
    if set(sharding.experts) & active:
        unsupported.append("expert parallelism (sharding.experts)")
    if sharding.tensor is not None and sharding.tensor.axis in active:
        unsupported.append("tensor parallelism (sharding.tensor)")
    if sharding.pipeline is not None and sharding.pipeline.axis in active:
        unsupported.append("pipeline parallelism (sharding.pipeline)")
    if set(sharding.sequence) & active:
        unsupported.append("context parallelism (sharding.sequence)")
    if replicate and shard and (len(replicate) > 1 or len(shard) > 1):
        unsupported.append("HSDP over more than one replicate or shard axis")
    precision = spec.schedule.precision
    if replicate and not shard and precision.reduce != precision.params:
        unsupported.append("a gradient reduction dtype other than the parameters' under DDP (schedule.precision.reduce)")
    return ParallelPlan(dict(mesh), replicate, shard, DTYPE_NAMES[precision.compute], DTYPE_NAMES[precision.reduce],
                        tuple(unsupported))


def emit_parallel(spec, plan: ParallelPlan, blocks: int, header: list[str]) -> str:
    where = _locator(spec)
    shape, names = tuple(plan.axes.values()), tuple(plan.axes)
    lines = [f"# {line}" if line else "#" for line in header] + [
        "",
        "from __future__ import annotations",
        "",
        "import torch",
        "from torch.distributed._composable.replicate import replicate",
        "from torch.distributed.device_mesh import DeviceMesh, init_device_mesh",
        "from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard",
        "",
        f"MESH_SHAPE = {shape!r}  {where('mesh', 'axes')}",
        f"MESH_AXES = {names!r}",
        f"DATA_PARALLEL = {plan.data_parallel!r}  {where('sharding', 'batch')}: each rank reads its slice of the batch",
        f"UNSUPPORTED = {plan.unsupported!r}  # asked for by the spec, not executed yet",
        "",
        "",
        "def make_mesh(device_type: str) -> DeviceMesh:",
        f"    return init_device_mesh(device_type, MESH_SHAPE, mesh_dim_names=MESH_AXES)  {where('mesh')}",
        "",
        "",
        "def parallelize(model: torch.nn.Module, mesh: DeviceMesh) -> torch.nn.Module:",
        '    """Data parallelism over the batch axes (FSDP2 per block, then the root; or DDP)."""',
        *_apply(plan, blocks, where),
        "    return model",
    ]
    return "\n".join(lines) + "\n"


def _apply(plan: ParallelPlan, blocks: int, where) -> list[str]:
    if not plan.data_parallel:
        return ["    # no data-parallel axis larger than 1: every rank holds the whole model"]
    if not plan.shard:
        return [
            f"    dp_mesh = {_flat(plan.replicate)}  # replicate over {' x '.join(plan.replicate)}",
            f"    replicate(model, device_mesh=dp_mesh)  # DDP: gradients all-reduced, averaged  {where('sharding', 'batch')}",
        ]
    if plan.replicate:
        mesh, what = f"mesh[{plan.replicate + plan.shard!r}]", f"HSDP: replicate over {plan.replicate[0]}, shard over {plan.shard[0]}"
    else:
        mesh, what = _flat(plan.shard), "FSDP: shard over " + " x ".join(plan.shard)
    return [
        f"    policy = MixedPrecisionPolicy(param_dtype={plan.param_dtype}, reduce_dtype={plan.reduce_dtype})  "
        f"{where('schedule', 'precision')}",
        f"    dp_mesh = {mesh}  # {what}",
        f"    for block in model.blocks:  # blocks.0 .. blocks.{blocks - 1}, one unit each",
        f"        fully_shard(block, mesh=dp_mesh, mp_policy=policy)  {where('sharding', 'fsdp')}",
        "    fully_shard(model, mesh=dp_mesh, mp_policy=policy)  # the root: embeddings, final norm, head",
    ]


def _flat(axes: tuple[str, ...]) -> str:
    return f"mesh[{axes[0]!r}]" if len(axes) == 1 else f"mesh[{axes!r}]._flatten({'_'.join(axes)!r})"


def _locator(spec):
    """``where(*path)``: ``# specs/x.yaml:12 mesh.axes`` for a spec path, as model.py's comments."""
    source = getattr(spec, "source", None)

    def where(*path) -> str:
        found = source.locate(path) if source is not None else None
        label = ".".join(path)
        return f"# {source.file}:{found[0]} {label}" if found else f"# {label}"

    return where
