"""The multi-token prediction loss (``head.mtp``, DeepSeek-V3 section 2.2): lambda x the mean of the depths' cross-entropies."""

from __future__ import annotations

from torch import Tensor

from moec.train.vocab_loss import cross_entropy


def mtp_losses(mtp_logits: tuple[Tensor, ...], targets: Tensor, vocab_mesh=None) -> list[Tensor]:
    """Each depth's cross-entropy. ``targets[:, j]`` is token j+1, so depth k's position i (predicting token i+k+1)
    is scored against ``targets[:, i+k]``: logits ``[:, :S-k]`` against ``targets[:, k:]``; the last k positions
    have no target."""
    return [cross_entropy(logits[:, : logits.shape[1] - k], targets[:, k:], vocab_mesh) for k, logits in enumerate(mtp_logits, 1)]


def mtp_loss(losses: list[Tensor], weight: float) -> Tensor:
    """lambda x the mean over depths: what the training loss adds."""
    return weight * sum(losses) / len(losses)
