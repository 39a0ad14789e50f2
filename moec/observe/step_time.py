"""Where a training step's wall time goes, from host clocks only (no device synchronisation of its own).

Each train row of metrics.jsonl gets ``time_s``: ``step``, the wall time since the previous train row
(the loop's period), and the parts measured inside it: ``data``, ``forward_backward``, ``optimizer``,
``collectives``, ``stats``, ``checkpoint``, ``eval`` and ``profiler`` seconds. They add up to ``step``
but for the loop's bookkeeping (writing the row, the progress bar). ``checkpoint`` and ``eval`` are the
stalls after the previous step (a checkpoint is written after its step's row); ``profiler`` is the
profiler's own work (writing the trace and summary after the last profiled step).

On CUDA a part ends where the host next waits for the device, which the step already does where it
reads a loss or the gradient norm (``.item()``): forward_backward includes the device's time up to the
last micro-batch's loss, optimizer the clipping's norm. ``collectives`` is the data-parallel gradient
reduction (``parallel.reduce_gradients``); the expert-parallel all-to-alls and FSDP2's reduce-scatters
run inside forward_backward and are not separated here (each would need a synchronisation): the
profiler's ``moe.all_to_all`` range shows the former. Under a pipeline, forward_backward is the
schedule's whole step.
"""

from __future__ import annotations

import contextlib
import time

PARTS = ("data", "forward_backward", "optimizer", "collectives", "stats", "checkpoint", "eval", "profiler")


class StepClock:
    def __init__(self):
        self.parts = dict.fromkeys(PARTS, 0.0)
        self.last_row = time.perf_counter()

    @contextlib.contextmanager
    def part(self, name: str):
        assert name in self.parts, name
        start = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] += time.perf_counter() - start

    def row(self) -> dict:
        """The seconds since the previous row and of each part in them; starts the next period."""
        now = time.perf_counter()
        row = {"step": now - self.last_row} | self.parts
        self.parts, self.last_row = dict.fromkeys(PARTS, 0.0), now
        return {name: round(seconds, 6) for name, seconds in row.items()}


def progress_text(times: dict) -> str:
    """The progress line's share of the step: ``fwd+bwd 71% opt 12% data 3% ckpt 10%`` (parts above 1%)."""
    step = max(times["step"], 1e-12)
    short = {"data": "data", "forward_backward": "fwd+bwd", "optimizer": "opt", "collectives": "comm", "stats": "stats",
             "checkpoint": "ckpt", "eval": "eval", "profiler": "prof"}
    return " ".join(f"{short[name]} {times[name] / step:.0%}" for name in PARTS if times[name] / step >= 0.01)
