"""``moec train --profile START:END``: torch.profiler over those steps, a trace and a summary per rank.

Each rank writes ``<run>/profile/rank<R>.pt.trace.json.gz`` (Chrome trace format: Perfetto,
chrome://tracing and TensorBoard's profiler plugin open it) and ``rank<R>.summary.csv``: the
operators with the most self time, the MoE phases the generated forward names
(``moec.backends.torch.phases``) by time and share of the profiled steps, and the FLOPs the
profiler counts (``with_flops``: matrix multiplications and convolutions) over that time.
Phase times are the forward's ranges (backward and optimizer fall in "rest of the step");
on CUDA they are device time, on the CPU wall time on the host.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moec.backends.torch.phases import MOE_PHASES

TOP_OPERATORS = 15
REST = "rest of the step"  # attention, backward, optimizer, data, logging


@dataclass
class SummaryRow:
    section: str  # "operator", "phase" or "total"
    name: str
    calls: int
    seconds: float
    share: float  # of the profiled steps' time
    flops: int = 0


@dataclass
class ProfileSummary:
    steps: int
    step_seconds: float  # the profiled steps' time, summed
    flops: int
    rows: list[SummaryRow] = field(default_factory=list)

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.step_seconds if self.step_seconds > 0 else 0.0

    def section(self, name: str) -> list[SummaryRow]:
        return [row for row in self.rows if row.section == name]


def parse_window(text: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4): steps numbered from 1, both included."""
    start, sep, end = text.partition(":")
    if not sep or not start.strip().isdigit() or not end.strip().isdigit():
        raise ValueError(f"--profile takes START:END (step numbers, e.g. 2:4), got {text!r}")
    window = int(start), int(end)
    if window[0] < 1 or window[1] < window[0]:
        raise ValueError(f"--profile {text}: START must be >= 1 and END >= START")
    return window


class StepProfiler:
    """torch.profiler with a schedule that records steps ``start``..``end``; ``step()`` after each training step."""

    def __init__(self, window: tuple[int, int], first_step: int, run_dir: Path, rank: int, device: torch.device, on_summary=None):
        from torch.profiler import ProfilerActivity, profile, schedule

        start, end = max(window[0], first_step + 1), window[1]  # a resumed run profiles what is left of the window
        self.active = end >= start
        self.out_dir, self.rank, self.device, self.on_summary = Path(run_dir) / "profile", rank, device, on_summary
        self.summary: ProfileSummary | None = None
        if not self.active:
            self.profiler = None
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        before = start - first_step - 1  # the steps of this process before the window
        warmup = min(before, 1)  # the step before the window warms the profiler up (not recorded) where there is one
        with warnings.catch_warnings():  # "won't be using warmup": a window starting at the first step has none
            warnings.filterwarnings("ignore", message="Profiler won't be using warmup")
            self.profiler = profile(activities=activities, on_trace_ready=self._ready, with_flops=True,
                                    schedule=schedule(skip_first=before - warmup, wait=0, warmup=warmup, active=end - start + 1, repeat=1))

    def __enter__(self):
        if self.profiler is not None:
            self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        if self.profiler is not None:
            self.profiler.__exit__(*exc)

    def step(self) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def _ready(self, prof) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.trace_path))
        self.summary = summarize(prof.key_averages(), self.device.type == "cuda")
        write_csv(self.summary, self.out_dir / f"rank{self.rank}.summary.csv")
        if self.on_summary is not None:
            self.on_summary(self)

    @property
    def trace_path(self) -> Path:
        return self.out_dir / f"rank{self.rank}.pt.trace.json.gz"  # TensorBoard's plugin looks for *.pt.trace.json.gz


def _seconds(event, cuda: bool, self_time: bool) -> float:
    """An averaged event's time in seconds: device time on CUDA where it has some, else host time."""
    if cuda:
        device = event.self_device_time_total if self_time else event.device_time_total
        if device > 0:
            return device / 1e6
    return (event.self_cpu_time_total if self_time else event.cpu_time_total) / 1e6


def _is_step(key: str) -> bool:
    """A ``ProfilerStep#N`` range (``ProfilerStep*`` once key_averages has grouped them)."""
    return key.startswith("ProfilerStep")


def summarize(events, cuda: bool) -> ProfileSummary:
    """The summary of a profiler's ``key_averages()``: steps are its ``ProfilerStep#N`` ranges."""
    steps = [e for e in events if _is_step(e.key)]
    step_seconds = sum(_seconds(e, False, False) for e in steps)  # a step's range is host time, whatever the device
    count = sum(e.count for e in steps)
    total = max(step_seconds, 1e-12)
    flops = sum(int(e.flops or 0) for e in events)
    ops = [e for e in events if not _is_step(e.key) and e.key not in MOE_PHASES]  # aten ops, custom ops, autograd nodes, optimizer
    operators = sorted(ops, key=lambda e: _seconds(e, cuda, True), reverse=True)[:TOP_OPERATORS]
    rows = [SummaryRow("operator", e.key, e.count, _seconds(e, cuda, True), _seconds(e, cuda, True) / total, int(e.flops or 0))
            for e in operators]
    by_name = {e.key: e for e in events}
    phases = [SummaryRow("phase", name, by_name[name].count, _seconds(by_name[name], cuda, False),
                         _seconds(by_name[name], cuda, False) / total) for name in MOE_PHASES if name in by_name]
    rest = step_seconds - sum(row.seconds for row in phases)
    phases.append(SummaryRow("phase", REST, count, rest, rest / total))
    rows += phases + [SummaryRow("total", f"{count} profiled steps", count, step_seconds, 1.0, flops)]
    return ProfileSummary(count, step_seconds, flops, rows)


def write_csv(summary: ProfileSummary, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["section", "name", "calls", "seconds", "share", "flops"])
        for row in summary.rows:
            writer.writerow([row.section, row.name, row.calls, f"{row.seconds:.6f}", f"{row.share:.4f}", row.flops])


def summary_tables(summary: ProfileSummary, title: str):
    """Two rich tables: the MoE phases (with the rest of the step) and the top operators by self time."""
    from rich.table import Table

    counted = (f"{summary.flops / 1e9:.2f} GFLOP counted by the profiler, {summary.flops_per_s / 1e9:.2f} GFLOP/s achieved"
               if summary.flops else "no FLOPs counted")
    phases = Table(title=f"{title}: MoE phases (forward) in {summary.steps} profiled steps of {summary.step_seconds * 1e3:.1f} ms",
                   caption=counted, title_justify="left", caption_justify="left")
    for column in ("phase", "calls", "ms", "share of the steps"):
        phases.add_column(column, justify="left" if column == "phase" else "right")
    for row in summary.section("phase"):
        phases.add_row(row.name, str(row.calls), f"{row.seconds * 1e3:.2f}", f"{row.share:.1%}")
    operators = Table(title=f"{title}: top {TOP_OPERATORS} operators by self time", title_justify="left")
    for column in ("operator", "calls", "self ms", "share", "GFLOP"):
        operators.add_column(column, justify="left" if column == "operator" else "right")
    for row in summary.section("operator"):
        operators.add_row(row.name, str(row.calls), f"{row.seconds * 1e3:.2f}", f"{row.share:.1%}",
                          f"{row.flops / 1e9:.3f}" if row.flops else "-")
    return phases, operators
