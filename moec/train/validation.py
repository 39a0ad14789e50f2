"""The validation pass of ``moec train``: ``train.eval.batches`` batches of the val split, one row."""

from __future__ import annotations

import math

import torch

from moec.distributed.processes import local_slice
from moec.observe.metrics import bits_per_byte


@torch.no_grad()
def validation_losses(trainer) -> list[float] | None:
    """Each validation batch's task loss on this rank, or None when a signal arrived mid-way (a partial mean
    is not written)."""
    trainer.model.eval()
    losses = []
    try:
        for index in range(trainer.train.eval.batches):
            if trainer.stop.poll(trainer.dist.distributed, trainer.device):  # SIGINT: stop within one batch
                return None
            batch = trainer.data.batch("val", index, trainer.train.batch)
            inputs = local_slice(batch.inputs, trainer.dist).to(trainer.device)
            targets = local_slice(batch.targets, trainer.dist, trainer.per_position).to(trainer.device)
            with trainer.autocast():
                if trainer.pipeline is not None:  # forward only through the stages
                    losses.append(trainer.pipeline.eval_loss(inputs, targets))
                    continue
                out = trainer.model(inputs)
            losses.append(trainer.task_loss(out.output, targets).item())
    finally:
        trainer.model.train()
    return losses


def validation_row(step: int, val: float, token_model: bool, bytes_per_token: float | None,
                   baseline_mse: float | None) -> dict:
    """The eval row of metrics.jsonl: the loss, and bits per byte (text), per token, or the MSE against the
    last-value baseline (series)."""
    row = {"kind": "eval", "step": step, "val_loss": val}
    if token_model:  # bits per byte where the bytes behind a token are known (text), else per token
        row |= {"val_bits_per_byte": bits_per_byte(val) / bytes_per_token} if bytes_per_token else {"val_bits_per_token": bits_per_byte(val)}
    else:
        row["val_mse"] = val
        row["val_mse_over_last_value"] = val / baseline_mse if baseline_mse else math.nan
    return row
