"""Memory per step, CUDA allocator snapshots, and what an out-of-memory error leaves behind.

Train rows get ``memory``: on CUDA the step's peak ``allocated_bytes`` / ``reserved_bytes``
(the allocator's peaks, reset after each step); on the CPU the process's resident set now and its
high-water mark (``rss_bytes``, ``peak_rss_bytes``; the CPU has no per-step peak without the
profiler, see ``moec.observe.cpu_memory``). ``--memory-snapshot STEP`` records the CUDA caching
allocator's history from the start of the run and dumps it after step STEP to
``<run>/memory/rank<R>_step<STEP>.pickle``, which PyTorch's memory_viz page opens (drag the file
onto it). An out-of-memory error dumps the allocator's state the same way before the run stops.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch

HISTORY_ENTRIES = 100_000  # allocation events kept (torchtitan's default)


def step_memory(device: torch.device) -> dict:
    """This step's memory numbers; on CUDA the peaks are reset for the next step."""
    if device.type == "cuda":
        row = {"allocated_bytes": torch.cuda.max_memory_allocated(device), "reserved_bytes": torch.cuda.max_memory_reserved(device)}
        torch.cuda.reset_peak_memory_stats(device)
        return row
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux: KiB
    return {"rss_bytes": _rss_now(), "peak_rss_bytes": peak}


def _rss_now() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        return 0


class MemorySnapshots:
    """``--memory-snapshot STEP`` and the dump on out-of-memory (CUDA only)."""

    def __init__(self, run_dir: Path, rank: int, device: torch.device, at_step: int | None):
        if at_step is not None and device.type != "cuda":
            raise ValueError(f"--memory-snapshot records the CUDA caching allocator; this run is on {device.type}")
        self.dir, self.rank, self.device, self.at_step = Path(run_dir) / "memory", rank, device, at_step
        self.recording = False

    def start(self) -> None:
        if self.at_step is not None:
            torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES)
            self.recording = True

    def after_step(self, step: int) -> Path | None:
        """Dump (and stop recording) after the step asked for; returns the file written."""
        if step != self.at_step:
            return None
        path = self.dump(f"step{step}")
        torch.cuda.memory._record_memory_history(enabled=None)
        self.recording = False
        return path

    def dump(self, label: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"rank{self.rank}_{label}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        return path

    def on_out_of_memory(self, step: int) -> str:
        """The allocator's state after an OOM at ``step``, dumped; the sentence that names the file."""
        try:
            path = self.dump(f"oom_step{step}")
        except (OSError, RuntimeError) as err:
            return f"no memory snapshot could be written ({err})"
        detail = "with the allocation history" if self.recording else "segments only: --memory-snapshot records the history"
        return f"the allocator's snapshot is {path} ({detail}; open it in PyTorch's memory_viz)"
