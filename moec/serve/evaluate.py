"""``moec eval``: a trained model's validation loss, computed as the trainer computes it.

Same batches (``Dataset.batch("val", i, train.batch)`` for i < train.eval.batches), same
autocast, same loss and the same float arithmetic (the mean of the per-batch ``.item()``
losses), so the number equals the run's own validation loss at the checkpoint's step.
``--data FILES`` evaluates text files instead (every file is validation data).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from moec.data.datasets import Dataset, TextBytes, expand_globs, last_value_baseline, read_text
from moec.data.kinds import make_dataset
from moec.dtypes import autocast
from moec.observe.metrics import bits_per_byte

def dataset_for(spec, files: list[str] | None = None) -> Dataset:
    if not files:
        return make_dataset(spec)
    if spec.model.inputs.kind != "tokens" or spec.train.data.kind not in ("text", "hf_dataset"):
        raise ValueError(f"--data takes text files, for models trained on text; this one trained on {spec.train.data.kind} data")
    paths = expand_globs(files)
    if not paths:
        raise ValueError(f"--data {' '.join(files)}: no such files")
    text = read_text(paths)
    return TextBytes(spec.train.seed, spec.train.seq_len, spec.model.head.pool == "last", {"train": text, "val": text},
                     spec.train.data.tokenizer, {"train": paths, "val": paths})


@torch.no_grad()
def evaluate(model, spec, files: list[str] | None = None, batches: int | None = None) -> dict:
    """``{"val_loss", "val_bits_per_byte" | "val_bits_per_token" | "val_mse", "batches", "tokens"}``."""
    dataset = dataset_for(spec, files)
    batches = batches or spec.train.eval.batches
    device = next(model.parameters()).device
    token_model = spec.model.inputs.kind == "tokens"
    model.eval()
    losses = []
    for index in range(batches):
        batch = dataset.batch("val", index, spec.train.batch)
        inputs, targets = batch.inputs.to(device), batch.targets.to(device)
        with autocast(spec.schedule.precision.compute, device.type):
            output = model(inputs).output
        loss = (F.cross_entropy(output.float().reshape(-1, output.shape[-1]), targets.reshape(-1)) if token_model
                else F.mse_loss(output.float(), targets))
        losses.append(loss.item())
    val = sum(losses) / len(losses)
    row = {"val_loss": val, "batches": batches, "tokens": batches * spec.train.batch * spec.train.seq_len}
    if token_model:
        per_token = dataset.bytes_per_token
        row |= {"val_bits_per_byte": bits_per_byte(val) / per_token} if per_token else {"val_bits_per_token": bits_per_byte(val)}
    else:
        row["val_mse"] = val
        baseline = last_value_baseline(dataset, batches, spec.train.batch)
        row["val_mse_over_last_value"] = val / baseline if baseline else float("nan")
    return row


def run_validation_loss(checkpoint) -> float | None:
    """The validation loss the run itself logged at the checkpoint's step (meta.json's val_at), if it evaluated there."""
    value = checkpoint.meta.get("val_at", {}).get(str(checkpoint.step))
    return None if value is None else float(value)
