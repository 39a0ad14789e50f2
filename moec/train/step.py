"""One optimizer step of ``moec train`` on one process or data / expert / tensor-parallel ranks (a pipeline's
step is ``pipeline_step``'s): ``train.grad_accum`` micro-batches forward and backward, the gradients reduced
over ranks, clipped and applied, and the step's metrics row.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from moec.backends.output import mean_stats
from moec.distributed.processes import clip_grad_norm, local_slice
from moec.observe.memory_plan import held_bytes, plan_check
from moec.observe.metrics import compiled_graphs, moe_health, peak_memory_bytes
from moec.train import expert_traffic
from moec.train.annealing import set_annealed
from moec.train.errors import TrainingError
from moec.train.mtp import mtp_loss, mtp_losses
from moec.train.optim import lr_factor, set_learning_rates
from moec.train.vocab_loss import loss_context


@dataclass
class StepLosses:
    """A step's losses on this rank, each the mean over the micro-batches."""
    task: float = 0.0
    aux: float = 0.0
    mtp: list = field(default_factory=list)  # head.mtp: each depth's cross-entropy


def train_step(trainer, step: int) -> dict:
    """Step ``step`` (0-based): batches ``step * grad_accum + i`` of the train split; returns the train row."""
    set_learning_rates(trainer.optimizer, trainer.base_lrs, lr_factor(step, trainer.spec))
    set_annealed(trainer.annealed, step)
    start = time.perf_counter()
    expert_traffic.reset(trainer.program)
    losses, stats = forward_backward(trainer, step)
    if trainer.dist.distributed:
        with trainer.clock.part("collectives"):
            trainer.parallel.reduce_gradients(trainer.model, trainer.dist.mesh)
    with trainer.clock.part("optimizer"):
        clip = trainer.train.grad_clip if trainer.train.grad_clip is not None else math.inf
        trainer.scaler.unscale_(trainer.optimizer)  # clip and report the true gradient norm (no-op unless fp16)
        grad_norm = clip_grad_norm(list(trainer.model.parameters()), clip)
        trainer.optimizer_step()
        # the memory plan, checked on the first step: what this rank holds against the manifest
        held = held_bytes(trainer.model, trainer.optimizer, trainer.dist.distributed) if step == trainer.start_step else None
        trainer.optimizer.zero_grad(set_to_none=True)
    with trainer.clock.part("stats"):
        layers = [mean_over_ranks(mean_stats(layer), trainer.dist.distributed) for layer in zip(*stats)]
        health = moe_health(trainer.model.MOE_LAYERS + getattr(trainer.model, "MTP_MOE_LAYERS", ()), layers)
        trainer.update_selection_bias(health)
    row = train_row(trainer, step, losses, health, grad_norm, time.perf_counter() - start)
    if held is not None:
        row["memory_plan"] = plan_check(held, trainer.program.manifest)
    return row


def forward_backward(trainer, step: int) -> tuple[StepLosses, list]:
    """The micro-batches' forward and backward (gradients accumulate); their losses and MoE statistics."""
    accum, micro_batch = trainer.train.grad_accum, trainer.train.batch // trainer.train.grad_accum
    losses = StepLosses(mtp=[0.0] * trainer.mtp.depth if trainer.mtp else [])
    stats = []
    for micro in range(accum):
        with trainer.clock.part("data"):
            batch = trainer.data.batch("train", step * accum + micro, micro_batch)
            inputs = local_slice(batch.inputs, trainer.dist).to(trainer.device)
            targets = local_slice(batch.targets, trainer.dist, trainer.per_position).to(trainer.device)
        with trainer.clock.part("forward_backward"):
            with trainer.autocast():
                out = trainer.step_fn(inputs)
            task = trainer.task_loss(out.output, targets)
            loss = task + out.aux_loss.float()
            if trainer.mtp:  # lambda x the mean of the depths' cross-entropies (DeepSeek-V3's MTP loss)
                depths = mtp_losses(out.mtp_logits, targets, trainer.vocab_mesh)
                loss = loss + mtp_loss(depths, trainer.mtp.weight)
                losses.mtp = [total + depth.item() / accum for total, depth in zip(losses.mtp, depths)]
            if not torch.isfinite(loss):
                raise TrainingError(trainer.diverged_message(step, loss, inputs))
            with loss_context(trainer.vocab_mesh):  # a vocab-parallel loss's backward reduces over tp
                trainer.scaler.scale(loss / accum).backward()
            losses.task += task.item() / accum
            losses.aux += out.aux_loss.item() / accum
        stats.append(out.moe_stats)
    return losses, stats


def mean_over_ranks(stats, distributed: bool):
    """A layer's stats averaged over the data-parallel ranks (each saw its slice of the batch)."""
    if distributed:
        for value in stats:
            if value is not None:  # MoeStats' reward fields are None unless aux.entropy / aux.margin is set
                torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.AVG)
    return stats


def train_row(trainer, step: int, losses: StepLosses, health: dict, grad_norm: float, elapsed: float) -> dict:
    """The train row of metrics.jsonl (losses averaged over the data-parallel ranks)."""
    mean = trainer.dist.mean
    row = {
        "kind": "train", "step": step + 1, "loss": mean(losses.task + losses.aux),
        "task_loss": mean(losses.task), "aux_loss": mean(losses.aux),
        "aux_load_balance": sum(layer.pop("aux_load_balance") for layer in health.values()),
        "aux_z": sum(layer.pop("aux_z") for layer in health.values()),
        "lr": trainer.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
        "tokens_per_s": trainer.train.batch * trainer.train.seq_len / max(elapsed, 1e-9),
        "peak_memory_bytes": peak_memory_bytes(trainer.device), "moe": health,
    }
    if trainer.mtp:  # the weighted term the loss adds, then each depth's cross-entropy
        row["mtp_loss"] = mean(trainer.mtp.weight * sum(losses.mtp) / len(losses.mtp))
        row |= {f"mtp_loss_{k}": mean(total) for k, total in enumerate(losses.mtp, 1)}
        row["loss"] = mean(losses.task + losses.aux) + row["mtp_loss"]
    if trainer.spec.schedule.compile.enabled:
        row["compiled_graphs"] = compiled_graphs()
    if trainer.scaler.is_enabled():
        row |= {"loss_scale": trainer.scaler.get_scale(), "skipped_steps": trainer.skipped_steps}
    if trainer.dist.distributed and trainer.expert_parallel:
        row |= expert_traffic.step_bytes(trainer.program)
    return row
