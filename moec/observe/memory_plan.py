"""The memory plan, checked: the bytes of parameters, gradients and optimizer state a rank holds.

The manifest's ``memory_per_device`` plans them from the sharding annotations (parameters and
gradients in ``precision.params``, AdamW's two fp32 moments); this module measures what a rank
actually holds after its first step: the local shards of DTensors (FSDP2, expert parallelism), the
whole tensor otherwise. AdamW's 0-dim ``step`` counters are not counted (the plan leaves them out:
a few bytes per parameter tensor). The trainer writes both into the first step's metrics row.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, distributed: bool = False) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes on this rank (the largest over ranks when distributed);
    call it after the optimizer step and before the gradients are freed."""
    params = list(model.parameters())
    held = torch.tensor([
        sum(local_bytes(p) for p in params),
        sum(local_bytes(p.grad) for p in params if p.grad is not None),
        sum(local_bytes(value) for state in optimizer.state.values() for value in state.values()
            if isinstance(value, torch.Tensor) and value.dim() > 0),
    ], dtype=torch.float64)
    if distributed:
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
    return dict(zip(("params_bytes", "grads_bytes", "optimizer_bytes"), map(int, held.tolist())))


def plan_check(held: dict[str, int], manifest: dict) -> dict:
    """The metrics row's ``memory_plan``: held and planned bytes per device, and held / planned."""
    planned = manifest["memory_per_device"]
    total = sum(held.values())
    return {"held": held | {"total_bytes": total},
            "planned": {key: planned[key] for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "total_bytes")},
            "held_over_planned": total / planned["total_bytes"] if planned["total_bytes"] else float("nan")}
