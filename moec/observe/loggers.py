"""Where metrics rows go besides ``metrics.jsonl``: the loggers the spec's ``train.log`` names.

``metrics.jsonl`` (:class:`moec.observe.metrics.MetricsWriter`) is always first: plots, resume
and the summary read it. ``tensorboard`` writes the same numbers as TensorBoard scalars under
``<run>/tensorboard`` with torch's ``SummaryWriter`` (the optional ``tensorboard`` package):
``train/<field>``, ``eval/<field>``, ``moe/<layer>/<field>``, ``time/<part>_s`` and ``memory/<field>``, at the
row's step and wall time.
``wandb`` logs the same keys to Weights & Biases in offline mode (nothing leaves the machine; the
run lands in ``<run>/wandb/offline-run-*``, ``wandb sync`` uploads it later), with the resolved
spec as the run's config.
"""

from __future__ import annotations

from pathlib import Path

TRAIN_SCALARS = ("loss", "task_loss", "aux_loss", "aux_load_balance", "aux_z", "mtp_loss", "lr", "grad_norm", "tokens_per_s")
EVAL_SCALARS = ("val_loss", "val_bits_per_byte", "val_bits_per_token", "val_mse", "val_mse_over_last_value")
MOE_SCALARS = ("dropped_fraction", "gate_entropy")


def scalars(row: dict) -> dict[str, float]:
    """The row's numbers under the loggers' names: ``train/loss``, ``eval/val_loss``, ``moe/<layer>/<field>``."""
    names = TRAIN_SCALARS if row["kind"] == "train" else EVAL_SCALARS
    out = {f"{row['kind']}/{name}": row[name] for name in names if isinstance(row.get(name), (int, float))}
    out |= {f"train/{name}": value for name, value in row.items() if name.startswith("mtp_loss_")}  # per MTP depth
    for layer, health in row.get("moe", {}).items():
        out |= {f"moe/{layer}/{name}": health[name] for name in MOE_SCALARS}
    out |= {f"time/{part}_s": seconds for part, seconds in row.get("time_s", {}).items()}  # the step-time breakdown
    out |= {f"memory/{name}": value for name, value in row.get("memory", {}).items()}
    return out


class WandbLogger:
    def __init__(self, run_dir: Path, name: str, config: dict):
        import wandb

        self.run = wandb.init(mode="offline", dir=str(run_dir), project="moec", name=name, config=config,
                              settings=wandb.Settings(silent=True, x_disable_stats=True))

    def write(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


class TensorBoardLogger:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), flush_secs=10)

    def write(self, row: dict) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, row["step"], walltime=row.get("time"))
        if row["kind"] == "eval":
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunLoggers:
    """metrics.jsonl first, then the others, each row stamped once (the same time in every logger)."""

    def __init__(self, jsonl, others: list):
        self.jsonl, self.others = jsonl, others
        self.skipped = jsonl.skipped

    def write(self, row: dict) -> None:
        stamped = self.jsonl.stamp(row)
        self.jsonl.write_stamped(stamped)
        for logger in self.others:
            logger.write(stamped)

    def close(self) -> None:
        for logger in self.others:
            logger.close()


def run_loggers(jsonl, names: list[str], run_dir: Path, spec=None) -> RunLoggers:
    others = []
    for name in names:
        if name == "tensorboard":
            others.append(TensorBoardLogger(run_dir))
        elif name == "wandb":
            others.append(WandbLogger(run_dir, spec.name, spec.model_dump(mode="json")))
    return RunLoggers(jsonl, others)
