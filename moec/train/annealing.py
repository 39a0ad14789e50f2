"""Before each training step, every MoE layer's ``router.anneal`` buffer gets its annealed
settings' values at that step (moec.moe.anneal); evaluation uses the current step's values."""

from __future__ import annotations

import torch

from moec.moe.anneal import ANNEAL, anneal_values


def anneal_buffers(model: torch.nn.Module, program) -> list[tuple[torch.Tensor, object]]:
    """(buffer, MoeAttrs) for each MoE layer with an annealed setting."""
    buffers = dict(model.named_buffers())
    found = []
    for layer, moe in program.moe_layers():
        if moe.anneal is not None:  # a spectral layer's MoE parameters live under <layer>.moe
            found.append((buffers.get(f"{layer}.{ANNEAL}", buffers.get(f"{layer}.moe.{ANNEAL}")), moe))
    return [(buffer, moe) for buffer, moe in found if buffer is not None]  # under a pipeline: this rank's layers


@torch.no_grad()
def set_annealed(found: list, step: int) -> None:
    for buffer, moe in found:
        constants = (moe.router.temperature, moe.router.noise_std, moe.capacity.factor)
        buffer.copy_(torch.tensor(anneal_values(moe.anneal, constants, step), dtype=buffer.dtype))
