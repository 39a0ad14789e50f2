"""AdamW with per-group learning rates and decay rules, and the warmup + decay schedule."""

from __future__ import annotations

import math

import torch

# Which graph parameter groups (the `group` attribute set by lowering) each no_decay entry covers.
NO_DECAY_GROUPS = {"norms": {"norm"}, "biases": {"bias"}, "embeddings": {"embed"}, "router": {"router"}}


def param_groups(model: torch.nn.Module, graph, spec) -> list[dict]:
    """Groups by (learning rate, weight decay): router / experts / the rest, decay per spec."""
    optimizer = spec.train.optimizer
    group_of = {node.attr["name"]: node.attr.get("group", "rest") for node in graph.params()}
    no_decay = set().union(*(NO_DECAY_GROUPS[name] for name in optimizer.no_decay)) if optimizer.no_decay else set()
    lr_for = {"router": optimizer.lr_router, "experts": optimizer.lr_experts}
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        kind = group_of[name]
        lr = lr_for.get(kind, optimizer.lr)
        decay = 0.0 if kind in no_decay else optimizer.weight_decay
        key = (lr, decay, kind if kind in lr_for else "rest")
        group = groups.setdefault(key, {"params": [], "names": [], "lr": lr, "weight_decay": decay, "name": f"{key[2]} (decay {decay})"})
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[2], k[1]))]


def make_optimizer(model, graph, spec) -> torch.optim.Optimizer:
    optimizer = spec.train.optimizer
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, graph, spec)]
    return torch.optim.AdamW(groups, lr=optimizer.lr, betas=tuple(optimizer.betas), eps=optimizer.eps, foreach=False)


def lr_factor(step: int, spec) -> float:
    """Multiplier of each group's base lr at ``step`` (0-based): linear warmup, then decay to min_lr_ratio."""
    schedule, steps = spec.train.lr_schedule, spec.train.steps
    if schedule.warmup_steps and step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.kind == "constant":
        return 1.0
    progress = min(1.0, (step - schedule.warmup_steps) / max(1, steps - schedule.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule.kind == "cosine" else 1 - progress
    return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * shape


def set_learning_rates(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor
