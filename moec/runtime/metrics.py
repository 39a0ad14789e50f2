"""Per-step metrics: one JSON object per line in ``<run>/metrics.jsonl``.

Train rows: ``{"kind": "train", "step", "loss", "task_loss", "aux_loss", "aux_load_balance",
"aux_z", "lr", "grad_norm", "tokens_per_s", "peak_memory_bytes", "moe": {layer:
{"utilization": [fraction of routed (token, choice) pairs per expert], "dropped_fraction",
"gate_entropy"}}}``. Eval rows: ``{"kind": "eval", "step", "val_loss"}`` plus
``val_bits_per_byte`` for byte-level text or ``val_mse`` for continuous data.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch


def moe_health(layers: tuple[str, ...], stats) -> dict:
    """Per MoE layer, from the generated model's ``MoeStats``: expert utilisation, drops, entropy, aux terms."""
    health = {}
    for name, layer in zip(layers, stats):
        counts = layer.counts.float().tolist()
        total = sum(counts) or 1.0
        health[name] = {
            "utilization": [round(c / total, 6) for c in counts],
            "dropped_fraction": round(layer.dropped.item(), 6),
            "gate_entropy": round(layer.entropy.item(), 6),
            "aux_load_balance": layer.load_balance.item(),
            "aux_z": layer.z_loss.item(),
        }
    return health


def summarize_health(health: dict) -> dict:
    """Across layers: the mean dropped fraction and the most / least loaded expert's share x E."""
    if not health:
        return {"dropped": 0.0, "max_load": 1.0, "min_load": 1.0}
    loads = [share * len(layer["utilization"]) for layer in health.values() for share in layer["utilization"]]
    return {
        "dropped": sum(layer["dropped_fraction"] for layer in health.values()) / len(health),
        "max_load": max(loads),
        "min_load": min(loads),
    }


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


class MetricsWriter:
    def __init__(self, path: Path, truncate_after: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.exists():
            # Resuming: drop rows past the checkpoint, which the resumed run will write again.
            rows = [row for row in read_metrics(self.path) if row["step"] <= truncate_after]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        elif truncate_after is None:
            self.path.write_text("")

    def write(self, row: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row, allow_nan=True) + "\n")


class _NoMetrics:
    """What ranks other than 0 write to: nothing (rank 0 holds the run's metrics.jsonl)."""

    def write(self, row: dict) -> None:
        pass


NO_METRICS = _NoMetrics()


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def bits_per_byte(nats_per_byte: float) -> float:
    return nats_per_byte / math.log(2)
