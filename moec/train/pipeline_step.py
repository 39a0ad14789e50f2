"""Pipeline-parallel training under ``moec train``: the spec's ``sharding.pipeline``, composed with data parallelism.

Every rank builds the whole model on the meta device, cuts its stage(s) out of it
(``moec.backends.parallel.pipeline``: the prologue on the first stage, the final norm and head on the
last) and allocates only those, filled from the spec's seed (``materialize``: the same weights as one
process). A step reads ``microbatches`` micro-batches of the global
batch as one process with ``train.grad_accum`` x ``microbatches`` does (each data-parallel rank its slice of
each), runs the spec's schedule (gpipe, 1f1b, interleaved_1f1b) over them, computes the task loss plus the
aux losses on the last stage, averages gradients over the data-parallel ranks (FSDP2 on each stage over
the batch axes, or one flat all-reduce per bucket), clips by the norm over every stage's gradients and
steps each stage's AdamW. The logged losses come from the last stage (broadcast along the pipeline), the
MoE statistics from the stage that holds each layer (gathered), so ``metrics.jsonl`` has the rows one
process writes. Checkpoints keep the whole model's parameter names (``PipelinePart``): DCP writes each
stage's tensors once, and a run saved on a pipeline resumes on one process, or the reverse.

With ``sharding.tensor`` (tp > 1) as well, the generated ``parallel.py``'s ``tensor_parallel`` splits the
whole model's weights over the tp axis before the stages are cut: each stage's blocks run the rank-local
program (Megatron's f / g over the tp group, the ranks of one stage and one batch slice), the prologue and
epilogue stay whole. The split weights' gradients are DTensor shards: averaged over the batch axes by their
local shards, their norms made whole over tp before the sum along the pipeline.

With ``sharding.experts`` (ep > 1), ``parallel.py``'s ``shard_experts`` splits every MoE layer's experts over
the ep axis before the stages are cut: each stage's MoE layers hold their ep rank's experts (DTensors on
``mesh[ep]``), and the ep ranks of a stage, which run the same schedule in the same order, exchange routed
rows by all-to-all over their ep group. Expert gradients are summed over the other batch axes and divided by
all data-parallel ranks (the all-to-all's backward already summed over ep), as ``reduce_gradients`` does.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import time

import torch
import torch.distributed as dist
from torch import nn

from moec.backends.init import init_parameter
from moec.backends.output import mean_stats
from moec.backends.parallel.buckets import all_reduce_flat
from moec.backends.parallel.pipeline import (
    PipelineStage,
    build_schedule,
    pipeline_problem,
)
from moec.backends.parallel.plan import global_balance
from moec.backends.parallel.tensor import tensor_axis
from moec.distributed.processes import local_slice
from moec.dtypes import DTYPES, compute_dtype
from moec.observe.memory_plan import held_bytes, plan_check
from moec.observe.metrics import compiled_graphs, moe_health, peak_memory_bytes
from moec.passes.stages import stage_split
from moec.train import expert_traffic
from moec.train.annealing import set_annealed
from moec.train.errors import TrainingError
from moec.train.optim import lr_factor, set_learning_rates


class PipelineError(RuntimeError):
    """A pipeline this model or spec cannot run: one line for the user."""


class PipelinePart(nn.Module):
    """This rank's stage(s) as one module named like the whole model (``blocks.<i>...``, ``embed.weight``, ...),
    so optimizer groups, buffers and checkpoints address its tensors by the spec's names."""

    def __init__(self, stages: list[PipelineStage]):
        super().__init__()
        self.blocks = nn.ModuleDict({key: block for stage in stages for key, block in stage.blocks.items()})
        for stage in stages:
            for name, child in stage.named_children():
                if name != "blocks":
                    self.add_module(name, child)
        self.stages = stages  # a plain list: not registered again, so every tensor keeps one name
        self.MOE_LAYERS = tuple(layer for stage in stages for layer in stage.moe_layers)

    def train(self, mode: bool = True):
        super().train(mode)
        for stage in self.stages:  # the stages read self.training for their prologue / epilogue
            stage.train(mode)
        return self


def expert_axis(spec) -> str | None:
    """The expert-parallel axis when it is larger than 1 (one axis: several are refused at launch)."""
    axes = [axis for axis in spec.sharding.experts if spec.mesh.axes.get(axis, 1) > 1]
    return axes[0] if axes else None


@torch.no_grad()
def materialize(part: nn.Module, graph, seed: int, device) -> None:
    """Storage for a model built on the meta device, for this rank's stage(s) only, filled from the spec seed
    before any split. Each weight's values come from its own seed (``moec.backends.init``), so they are the
    one-process weights whatever else the rank holds."""
    part.to_empty(device=device)
    nodes = {node.attr["name"]: node for node in graph.params()}
    for name, tensor in itertools.chain(part.named_parameters(), part.named_buffers()):
        tensor.copy_(init_parameter(nodes[name], seed).to(tensor.dtype))


def pipeline_axis(spec) -> str | None:
    """The pipeline axis when it is larger than 1."""
    pipeline = spec.sharding.pipeline
    return pipeline.axis if pipeline is not None and spec.mesh.axes.get(pipeline.axis, 1) > 1 else None


class PipelineRun:
    """The schedule, this rank's stages and the step that drives them (the trainer calls it when pp > 1)."""

    def __init__(self, spec, program, model: nn.Module, dist_ctx, parallel=None):
        """``parallel``: the generated parallel.py as a module (the trainer's; loaded from ``program`` without one)."""
        problem = pipeline_problem(program.graph)
        if problem:
            raise PipelineError(f"sharding.pipeline: this model cannot be cut into pipeline stages: {problem}")
        options, axis = spec.sharding.pipeline, pipeline_axis(spec)
        self.spec, self.dist = spec, dist_ctx
        self.kind, self.microbatches, self.ranks = options.schedule, options.microbatches, spec.mesh.axes[axis]
        self.axis, self.group = axis, dist_ctx.mesh[axis].get_group()
        self.rank = dist_ctx.mesh[axis].get_local_rank()
        virtual = 2 if self.kind == "interleaved_1f1b" else 1  # two virtual stages per rank
        self.split = (tuple(stage_split(spec, program.graph, virtual * self.ranks)) if virtual > 1
                      else tuple(tuple(row["blocks"]) for row in program.manifest["pipeline_stages"]))
        self.mine = list(range(self.rank, len(self.split), self.ranks))
        self.stages = [PipelineStage(model, program.graph, *self.split[i]) for i in self.mine]
        self.part = PipelinePart(self.stages)
        if next(model.parameters()).is_meta:  # built without storage: only this rank's stages are allocated
            materialize(self.part, program.graph, spec.train.seed, dist_ctx.device)
        if parallel is None:
            from moec.compile import parallel_module

            parallel = parallel_module(program)
        self.expert_axis = expert_axis(spec)
        self._split_weights(model, parallel)
        self.expert_params = parallel.expert_parameters(model)  # the same Parameter objects the stages hold
        self.parallel = parallel
        self.all_moe_layers = tuple(getattr(model, "MOE_LAYERS", ()))
        self.holds_first, self.holds_last = self.stages[0].is_first, self.stages[-1].is_last
        self.pieces: list[torch.Tensor] = []  # per micro-batch on the last stage: (task loss, aux loss)
        self.loss_divisor = self.microbatches * spec.train.grad_accum  # micro-batches per optimizer step
        self.task_loss, self.loss_context = None, contextlib.nullcontext
        self.schedule = None

    # --- setup -------------------------------------------------------------------------------

    def _split_weights(self, model: nn.Module, parallel) -> None:
        """The whole model's weights split over tp, then its experts over ep, by parallel.py; the splits replace
        the modules' parameters in place, so the stages hold the shards."""
        spec, mesh = self.spec, self.dist.mesh
        if tensor_axis(spec) is not None:
            parallel.tensor_parallel(model, mesh)
        if self.expert_axis is not None:  # each rank keeps its ep rank's experts of every layer (EXPERT_PLACEMENT)
            axes = (self.expert_axis,) + ((tensor_axis(spec),) if hasattr(parallel, "EXPERT_TP_SPLITS") else ())  # tp x ep: 2-D
            expert_mesh = mesh[tuple(axis for axis in mesh.mesh_dim_names if axis in axes)]
            for experts in parallel.expert_modules(model):
                parallel.shard_experts(experts, expert_mesh)

    def describe(self) -> list[str]:
        """The split ``moec train`` prints: which blocks each stage runs, on which pipeline rank."""
        lines = [(f"pipeline: {len(self.split)} stages over {self.axis} ({self.ranks} ranks), {self.kind}, "
                  f"{self.microbatches} microbatches")]
        last = len(self.split) - 1
        for index, (first, end) in enumerate(self.split):
            extra = (" + embeddings" if index == 0 else "") + (" + final norm, head" if index == last else "")
            lines.append(f"  stage {index}: blocks {first}-{end}{extra} on {self.axis} rank {index % self.ranks}")
        return lines

    def parallelize(self, compile_block, task_loss, loss_context=contextlib.nullcontext) -> PipelinePart:
        """Compile each block's forward (when asked), apply data parallelism to each stage, build the schedule.
        ``loss_context()``: where the schedule runs the loss and its backward (a vocab-parallel loss's)."""
        self.task_loss, self.loss_context = task_loss, loss_context
        if compile_block is not None:
            # under expert parallelism the all-to-all's split sizes are host integers: graph breaks around the exchange
            options = {"fullgraph": False} if self.expert_axis is not None else {}
            for block in self.part.blocks.values():
                block.forward = compile_block(block.forward, **options)
        dp = self._dp_axes()
        if dp:
            if global_balance(self.spec):
                self.parallel.use_batch_group(self.part, self._dp_mesh.get_group())  # aux.load_balance_batch 'global'
            if self._fsdp_axes():
                self._shard_stages()
        # the loss scales itself (1 / (microbatches x grad_accum)): the schedule's own scaling would divide the
        # gradients of earlier grad_accum rounds again
        self.schedule = build_schedule(self.stages, self.ranks, self.rank, self.group, self.dist.device, self.kind,
                                       self.microbatches, self._loss, scale_grads=False)
        return self.part

    def _dp_axes(self) -> tuple[str, ...]:
        return tuple(axis for axis in self.dist.mesh.mesh_dim_names
                     if axis in self.spec.sharding.batch and self.spec.mesh.axes[axis] > 1)

    def _fsdp_axes(self) -> tuple[str, ...]:
        return tuple(axis for axis in self._dp_axes() if axis in self.spec.sharding.fsdp)

    def _mesh_of(self, axes: tuple[str, ...]):
        """The sub-mesh of ``axes``, flattened to one dim when there are several."""
        return self.dist.mesh[axes[0]] if len(axes) == 1 else self.dist.mesh[axes]._flatten("_".join(axes))

    @functools.cached_property
    def _dp_mesh(self):
        return self._mesh_of(self._dp_axes())

    @functools.cached_property
    def _other_dp_mesh(self):
        """The batch axes other than the expert-parallel one (None when there are none)."""
        other = tuple(axis for axis in self._dp_axes() if axis != self.expert_axis)
        if other == self._dp_axes():
            return self._dp_mesh
        return self._mesh_of(other) if other else None

    def _shard_stages(self) -> None:
        """FSDP2 over the batch axes on each stage: one unit per block, then the stage (torchtitan's order)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        precision = self.spec.schedule.precision
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype(precision.compute), reduce_dtype=DTYPES[precision.reduce])
        mesh = self._dp_mesh
        for stage in self.stages:
            for block in stage.blocks.values():
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(stage, mesh=mesh, mp_policy=policy)

    # --- one step ------------------------------------------------------------------------------

    def _loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        prediction, aux_rows = output  # aux_rows[0]: the sum of the blocks' aux losses so far
        task, aux = self.task_loss(prediction, targets), aux_rows[0]
        self.pieces.append(torch.stack([task.detach().double(), aux.detach().double()]))
        return (task + aux) / self.loss_divisor

    def _run(self, inputs: torch.Tensor, targets: torch.Tensor, train: bool) -> None:
        """One pass of the schedule over ``microbatches`` micro-batches. On its first pass, and on the first after
        a switch between training and evaluation, the schedule infers the shapes between stages by running each
        stage and the loss once on uninitialised tensors: those losses and MoE stats come before the real ones
        and are dropped."""
        before = (len(self.pieces), [len(stage.recorded) for stage in self.stages])
        run = self.schedule.step if train else self.schedule.eval
        args = (inputs,) if self.holds_first else ()
        with self.loss_context():
            run(*args, target=targets if self.holds_last else None, losses=[])
        keep = self.microbatches
        self.pieces[before[0]:] = self.pieces[before[0]:][-keep:]
        for stage, start in zip(self.stages, before[1]):
            stage.recorded[start:] = stage.recorded[start:][-keep:]

    def _from_last_stage(self) -> tuple[float, float]:
        """(task, aux) loss, the mean over micro-batches, on every pipeline rank."""
        if self.holds_last:
            values = torch.stack(self.pieces).mean(0).to(self.dist.device)
        else:
            values = torch.zeros(2, dtype=torch.float64, device=self.dist.device)
        dist.broadcast(values, group=self.group, group_src=self.ranks - 1)
        return values[0].item(), values[1].item()

    def micro_batches(self, data, split: str, index: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batches ``index * M + m`` (m < M) of ``rows / M`` rows, as one process with grad_accum M reads them; this
        data-parallel rank's slice of each, one after the other (the schedule cuts them apart again)."""
        parts = [data.batch(split, index * self.microbatches + m, rows // self.microbatches) for m in range(self.microbatches)]
        inputs = torch.cat([local_slice(part.inputs, self.dist) for part in parts])
        targets = torch.cat([local_slice(part.targets, self.dist) for part in parts])
        return inputs.to(self.dist.device), targets.to(self.dist.device)

    def train_step(self, trainer, step: int) -> dict:
        """One optimizer step of ``trainer`` (moec.train.trainer.Trainer) through the pipeline: its metrics row."""
        train = trainer.train
        set_learning_rates(trainer.optimizer, trainer.base_lrs, lr_factor(step, self.spec))
        set_annealed(trainer.annealed, step)
        start = time.perf_counter()
        expert_traffic.reset(trainer.program)
        self.pieces.clear()
        for stage in self.stages:
            stage.recorded.clear()
        accum = train.grad_accum
        for round_ in range(accum):  # grad_accum rounds of the schedule, each over `microbatches` micro-batches
            inputs, targets = self.micro_batches(trainer.data, "train", step * accum + round_, train.batch // accum)
            with trainer.autocast():
                self._run(inputs, targets, train=True)
        task, aux = self._from_last_stage()
        if not math.isfinite(task + aux):
            raise TrainingError(f"loss is {task + aux} at step {step + 1} (pipeline parallel: per-layer diagnosis runs "
                                f"on one process); {trainer.last_checkpoint('good')}")
        self._average_gradients()
        clip = train.grad_clip if train.grad_clip is not None else math.inf
        grad_norm = self.clip_grad_norm(clip)
        trainer.optimizer_step()
        held = held_bytes(self.part, trainer.optimizer, True) if step == trainer.start_step else None
        trainer.optimizer.zero_grad(set_to_none=True)
        health = self.moe_health()
        trainer.update_selection_bias({layer: health[layer] for layer in self.part.MOE_LAYERS})
        elapsed = time.perf_counter() - start
        mean = self.dist.mean  # over every rank: a pipeline's ranks hold the same numbers, so the data-parallel mean
        row = {
            "kind": "train", "step": step + 1, "loss": mean(task + aux), "task_loss": mean(task), "aux_loss": mean(aux),
            "aux_load_balance": sum(layer.pop("aux_load_balance") for layer in health.values()),
            "aux_z": sum(layer.pop("aux_z") for layer in health.values()),
            "lr": trainer.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
            "tokens_per_s": train.batch * train.seq_len / max(elapsed, 1e-9),
            "peak_memory_bytes": peak_memory_bytes(self.dist.device), "moe": health,
        }
        if held is not None:
            row["memory_plan"] = plan_check(held, trainer.program.manifest)
        if self.spec.schedule.compile.enabled:
            row["compiled_graphs"] = compiled_graphs()
        if self.expert_axis is not None:
            row |= expert_traffic.step_bytes(trainer.program)
        return row

    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The task loss of one validation batch (this data-parallel rank's slice), forward only through the stages."""
        self.pieces.clear()
        self._run(inputs.to(self.dist.device), targets.to(self.dist.device), train=False)
        return self._from_last_stage()[0]

    def _average_gradients(self) -> None:
        """Without FSDP: average each stage's gradients over the data-parallel ranks, in flat buckets. Under
        sequence parallelism the norms saw S / tp positions on each tp rank: their partial gradients summed over tp
        first, and the vocabulary-split embedding's whole gradient cut to its rows (parallel.py's
        ``match_gradient_placements``)."""
        if hasattr(self.parallel, "match_gradient_placements"):
            self.parallel.match_gradient_placements(self.part)
        if not self._dp_axes() or self._fsdp_axes():
            return  # one data-parallel rank, or FSDP reduce-scattered them on the last micro-batch
        params = [param for param in self.part.parameters() if param.grad is not None]
        local = [param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad  # tp shards: their own part
                 for param in params if param not in self.expert_params]
        all_reduce_flat(local, self._dp_mesh.get_group(), op=dist.ReduceOp.AVG)
        experts = [param.grad.to_local() for param in params if param in self.expert_params]
        if experts:
            self._reduce_expert_gradients(experts)

    def _reduce_expert_gradients(self, grads: list[torch.Tensor]) -> None:
        """An expert's owner already holds the sum over its ep group (the all-to-all's backward brings every ep
        rank's rows; with ep outside the batch axes, the group shared its rows): summed over the other batch
        axes only, then divided by all data-parallel ranks, as parallel.py's reduce_gradients does."""
        if self._other_dp_mesh is not None:
            all_reduce_flat(grads, self._other_dp_mesh.get_group())
        ranks = math.prod(self.spec.mesh.axes[axis] for axis in self._dp_axes())
        for grad in grads:
            grad.div_(ranks)

    def clip_grad_norm(self, max_norm: float) -> float:
        """The norm of every stage's gradients together (each stage's sum of squares, summed along the pipeline),
        and the gradients scaled down to ``max_norm`` when it is larger: ``clip_grad_norm_`` of the whole model.
        A tp shard's norm is made whole over tp (``full_tensor``); a whole weight counts once, as every tp rank
        of the stage holds the same copy."""
        grads = [param.grad for param in self.part.parameters() if param.grad is not None]
        norms = [torch.linalg.vector_norm(grad) for grad in grads]
        norms = [norm.full_tensor() if hasattr(norm, "full_tensor") else norm for norm in norms]
        squares = torch.stack(norms).double().square().sum() if norms else torch.zeros((), dtype=torch.float64)
        squares = squares.to(self.dist.device)
        dist.all_reduce(squares, group=self.group)
        total = squares.sqrt().item()
        coefficient = max_norm / (total + 1e-6)
        if coefficient < 1.0:
            for grad in grads:
                grad.mul_(coefficient)
        return total

    def moe_health(self) -> dict:
        """Every MoE layer's statistics (mean over micro-batches and data-parallel ranks), from the stage holding it."""
        mine = {}
        for stage in self.stages:
            if stage.moe_layers and stage.recorded:
                layers = [self._dp_mean(mean_stats(layer)) for layer in zip(*stage.recorded)]
                mine |= moe_health(stage.moe_layers, layers)
        gathered: list[dict] = [{} for _ in range(self.ranks)]
        dist.all_gather_object(gathered, mine, group=self.group)
        merged = {name: layer for part in gathered for name, layer in part.items()}
        return {layer: merged[layer] for layer in self.all_moe_layers if layer in merged}

    def _dp_mean(self, stats):
        if self._dp_axes():
            group = self._dp_mesh.get_group()
            for value in stats:
                if value is not None:
                    dist.all_reduce(value, op=dist.ReduceOp.AVG, group=group)
        return stats


def make_pipeline(spec, program, model, dist_ctx, parallel=None) -> PipelineRun | None:
    """The pipeline run when the spec's pipeline axis is larger than 1."""
    return PipelineRun(spec, program, model, dist_ctx, parallel) if pipeline_axis(spec) and dist_ctx.distributed else None
