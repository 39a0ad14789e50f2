"""Per-step metrics: one JSON object per line in ``<run>/metrics.jsonl``.

Every row has ``kind``, ``step``, ``time`` (Unix seconds) and ``elapsed_s`` (seconds since the run
started, summed over resumes). Train rows: ``{"kind": "train", "step", "loss", "task_loss", "aux_loss", "aux_load_balance",
"aux_z", "lr", "grad_norm", "tokens_per_s", "peak_memory_bytes", "moe": {layer:
{"utilization": [fraction of routed (token, choice) pairs per expert], "dropped_fraction",
"gate_entropy"}}}``, with ``head.mtp`` also ``mtp_loss`` (the weighted term ``loss`` includes) and ``mtp_loss_<k>``
(depth k's cross-entropy); under expert parallelism ``expert_parallel_bytes_sent`` (the deduplicated dispatch's
off-rank bytes, forward and backward, summed over ranks), ``expert_parallel_bytes_undeduplicated`` (one row per
(token, choice) instead) and ``expert_parallel_destinations`` (the most ranks a token reached). Eval rows: ``{"kind": "eval", "step", "val_loss"}`` plus
``val_bits_per_byte`` for text (per byte of the text, whatever the tokenizer), ``val_bits_per_token``
for token files (whose bytes are unknown) or ``val_mse`` for continuous data.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
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
        if layer.entropy_loss is not None:  # aux.entropy / aux.margin set: the reward terms, per layer
            health[name] |= {"aux_entropy": layer.entropy_loss.item(), "aux_margin": layer.margin_loss.item()}
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


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (a recompilation builds another): flat after
    warm-up means no step recompiles."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def steady_tokens_per_s(result, tokens_seen: int, tokens_per_step: int, compiled: bool) -> float:
    """Tokens/s of the run; under torch.compile without the first step, whose time is compilation
    (reported as ``result.compile_s``). A one-step run has nothing else to measure."""
    if compiled and tokens_seen > tokens_per_step:
        result.compile_s = result.first_step_s
        return (tokens_seen - tokens_per_step) / max(result.seconds - result.first_step_s, 1e-9)
    return tokens_seen / max(result.seconds, 1e-9)


class MetricsWriter:
    """Appends one JSON line per row; never leaves a half line, never rewrites in place.

    Resuming keeps the rows up to the checkpoint's step: the file is rewritten to a temporary
    file and renamed over the old one, so a kill mid-rewrite leaves the old file, not an empty
    one. A failed append (a full disk) is cut back to the last complete line before the
    OSError propagates.
    """

    def __init__(self, path: Path, truncate_after: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.skipped: list[str] = []  # torn last lines dropped on resume, for the user to see
        self.elapsed_before = 0.0  # training seconds of the run before this process (resumed: the kept rows')
        if truncate_after is not None and self.path.exists():
            # Resuming: drop rows past the checkpoint, which the resumed run will write again.
            rows = [row for row in read_metrics(self.path, self.skipped) if row.get("step", 0) <= truncate_after]
            replace_atomically(self.path, "".join(json.dumps(row) + "\n" for row in rows))
            self.elapsed_before = max((row.get("elapsed_s", 0.0) for row in rows), default=0.0)
        elif truncate_after is None:
            replace_atomically(self.path, "")
        self.started = time.perf_counter()

    def stamp(self, row: dict) -> dict:
        """``row`` with ``time`` (Unix seconds, wall clock) and ``elapsed_s`` (seconds of this run, resumes
        included, the time between a stop and its resume not) after its kind and step."""
        head = {key: row[key] for key in ("kind", "step") if key in row}
        clock = {"time": round(time.time(), 3), "elapsed_s": round(self.elapsed_before + time.perf_counter() - self.started, 3)}
        return head | clock | row

    def write(self, row: dict) -> None:
        self.write_stamped(self.stamp(row))

    def write_stamped(self, row: dict) -> None:
        data = (json.dumps(row, allow_nan=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
            except OSError as err:
                os.ftruncate(fd, start)  # freeing space always works: no torn line is left behind
                raise OSError(err.errno, err.strerror, str(self.path)) from None
        finally:
            os.close(fd)


class _NoMetrics:
    """What ranks other than 0 write to: nothing (rank 0 holds the run's metrics.jsonl)."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


NO_METRICS = _NoMetrics()


def replace_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it and rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class MetricsFileError(ValueError):
    """metrics.jsonl is damaged before its last line; the message names the file and line."""


def read_metrics(path: Path, skipped: list | None = None) -> list[dict]:
    """Rows of a metrics.jsonl; a torn or unparsable last line (a crash or a full disk mid-write) is
    skipped and reported in ``skipped`` as ``"FILE:LINE: ..."``, damage anywhere else is a
    :class:`MetricsFileError`."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    rows = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as err:
            reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
            if number - 1 == last:
                if skipped is not None:
                    skipped.append(f"{path}:{number}: skipped a torn last line ({reason})")
                continue
            raise MetricsFileError(f"{path}:{number}: not a metrics row ({reason})") from None
        rows.append(row)
    return rows


def bits_per_byte(nats_per_byte: float) -> float:
    return nats_per_byte / math.log(2)
