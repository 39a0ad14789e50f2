"""Interleaved timing: every candidate runs once per repetition, in turn, so that load from
other processes on the machine hits all of them alike; medians and spread over repetitions."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    name: str
    median_s: float
    low_s: float  # fastest repetition
    high_s: float  # slowest repetition
    peak_bytes: int | None  # peak memory of one step on a GPU (None on the CPU)

    def ratio_to(self, other: "Timing") -> float:
        """How many times faster this is than ``other`` (> 1: faster)."""
        return other.median_s / self.median_s


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def interleaved(steps: dict[str, Callable[[], None]], device: torch.device, reps: int = 7, inner: int = 1,
                warmup: int = 2, progress: Callable[[str], None] | None = None) -> list[Timing]:
    """Median over ``reps`` repetitions of the time of ``inner`` calls of each step, interleaved."""
    for name, step in steps.items():
        if progress:
            progress(f"warming up {name}")
        for _ in range(warmup):
            step()
    _synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(reps):
        if progress:
            progress(f"repetition {rep + 1}/{reps}")
        for name, step in steps.items():
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(inner):
                step()
            _synchronize(device)
            samples[name].append((time.perf_counter() - start) / inner)
    peaks = {name: _peak_bytes(step, device) for name, step in steps.items()}
    return [Timing(name, statistics.median(times), min(times), max(times), peaks[name]) for name, times in samples.items()]


def prefixed(progress: Callable[[str], None] | None, prefix: str) -> Callable[[str], None] | None:
    """``progress`` with each message after ``prefix: ``; None stays None."""
    return (lambda text: progress(f"{prefix}: {text}")) if progress else None
