"""What every backend's model returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch


class MoeStats(NamedTuple):
    """Detached health numbers of one MoE layer for one forward pass (generated models only)."""

    counts: torch.Tensor  # (E,) routed (token, choice) pairs per expert, before capacity drops
    dropped: torch.Tensor  # () fraction of the routed choices that capacity dropped
    entropy: torch.Tensor  # () mean entropy of the per-token normalised router scores
    load_balance: torch.Tensor  # () the weighted load-balance term of the aux loss
    z_loss: torch.Tensor  # () the weighted z-loss term
    # Layers with aux.entropy or aux.margin only: the weighted reward terms (negative), else None
    entropy_loss: torch.Tensor | None = None
    margin_loss: torch.Tensor | None = None

    def detached(self, dtype: torch.dtype) -> MoeStats:
        """Every field detached from the graph and in ``dtype`` (the statistics carry no gradient)."""
        return MoeStats(*[None if value is None else value.detach().to(dtype) for value in self])


def mean_stats(stats: Sequence[MoeStats]) -> MoeStats:
    """Field-wise mean: over the steps of a spectral MoE, or the micro-batches of a training step."""
    return MoeStats(*[None if values[0] is None else torch.stack(list(values)).mean(0) for values in zip(*stats)])


@dataclass
class ModelOutput:
    output: torch.Tensor  # logits [B,S,V] / predictions [B,S,out] (S is 1 with pool: last)
    aux_loss: torch.Tensor  # scalar: the weighted sum of every MoE layer's aux losses (the MTP modules' blocks included)
    # Generated models only: one MoeStats per MoE layer, in the order of the class's MOE_LAYERS.
    moe_stats: tuple[MoeStats, ...] = ()
    # Multi-token prediction (head.mtp; training only): depth k's logits [B,S,V], position i predicting token i+k+1.
    mtp_logits: tuple[torch.Tensor, ...] = ()
    # Multi-token prediction, outside training: the last block's hidden state [B,S,D] before the final norm (what the
    # MTP modules read when they draft tokens for self-speculative decoding).
    hidden: torch.Tensor | None = None
