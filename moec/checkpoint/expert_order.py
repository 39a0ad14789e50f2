"""Checkpoints hold experts in id order, whatever the placement that trained them.

Under ``sharding.placement: consistent_hash`` the generated ``shard_experts`` stores each MoE
layer's [E, ...] expert weights with their rows grouped by owner rank (``EXPERT_ORDER``: the
expert in each row) and marks the module with ``expert_order``. Saved as they are, a checkpoint's
row i would be a different expert under another placement or ep size. So the checkpoint state
turns such weights and their AdamW moments into full tensors in expert-id order before DCP
writes them (every rank holds the same tensor; DCP writes it once), and back into this run's
sharded rows after DCP reads them. Contiguous placements are stored as DTensors, untouched.

The gather costs one full copy of each permuted expert weight per rank during a save or load.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def permuted_experts(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, tuple[int, ...]]]:
    """Fully qualified name of every expert weight stored in another row order -> (parameter, its order)."""
    found = {}
    for name, module in model.named_modules():
        order = getattr(module, "expert_order", None)
        if order is None:
            continue
        for param_name, param in module.named_parameters(recurse=False):
            found[f"{name}.{param_name}" if name else param_name] = (param, tuple(order))
    return found


def to_id_order(state: dict, model: torch.nn.Module) -> None:
    """In ``{"model": ..., "optim": ...}`` (optimizer entries ``<param>.<slot>``), in place."""
    for fqn, (_, order) in permuted_experts(model).items():
        for table, key in _entries(state, fqn):
            full = table[key].full_tensor()
            table[key] = torch.empty_like(full).index_copy_(0, torch.tensor(order, device=full.device), full)


def from_id_order(state: dict, model: torch.nn.Module) -> None:
    """Undo :func:`to_id_order` after DCP filled the id-ordered tensors: this rank's rows of this run's placement."""
    for fqn, (param, order) in permuted_experts(model).items():
        for table, key in _entries(state, fqn):
            rows = table[key][list(order)]
            table[key] = distribute_tensor(rows, param.device_mesh, param.placements, src_data_rank=None)


def _entries(state: dict, fqn: str):
    """(table, key) of the weight and of each of its optimizer slots shaped like it (not AdamW's step)."""
    yield state["model"], fqn
    for key, value in list(state["optim"].items()):
        if key.rsplit(".", 1)[0] == fqn and (isinstance(value, DTensor) or value.dim() > 0):
            yield state["optim"], key
