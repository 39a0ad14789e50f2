"""What every backend's model returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    output: torch.Tensor  # logits [B,S,V] / predictions [B,S,out] (S is 1 with pool: last)
    aux_loss: torch.Tensor  # scalar: the weighted sum of every MoE layer's aux losses
    # Generated models only: one detached vector per MoE layer (names in the class's
    # MOE_LAYERS): tokens per expert (E values), dropped fraction, gate entropy, and the
    # weighted load-balance and z-loss terms. See moec.runtime.metrics.
    moe_stats: tuple = ()
