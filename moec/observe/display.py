"""What the user sees while training: a rich progress bar, eval lines, a final summary."""

from __future__ import annotations

import contextlib
import math
import os
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from moec.observe.metrics import summarize_health
from moec.observe.step_time import progress_text


class Display:
    def __init__(self, console: Console | None = None):
        self.console = console or _console()

    @contextlib.contextmanager
    def progress(self, trainer):
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            # torch.compile runs inside the first step: say so while the bar waits (the elapsed time ticks)
            first = "compiling" if trainer.spec.schedule.compile.enabled else "train"
            if first == "compiling" and not self.console.is_terminal:  # no live bar to show it
                log_line(self.console, "compiling: torch.compile runs in the first step")
            task = progress.add_task(first, total=trainer.train.steps, completed=trainer.start_step, info="")
            yield _Bar(progress, task, self.console, trainer.train.steps)

    def log(self, message: str) -> None:
        log_line(self.console, escape(message))  # paths and spec names are user text, never markup

    def log_eval(self, row: dict) -> None:
        extra = (f"bits/byte {row['val_bits_per_byte']:.3f}" if "val_bits_per_byte" in row
                 else f"bits/token {row['val_bits_per_token']:.3f}" if "val_bits_per_token" in row
                 else f"mse {row['val_mse']:.5f} ({row['val_mse_over_last_value']:.3f} x last-value baseline)")
        log_line(self.console, f"eval step {row['step']}: val loss {row['val_loss']:.4f}, {extra}")

    def profile(self, profiler, name: str) -> None:
        """The profiled steps' summary tables (rank 0's) and where each rank's trace is."""
        from moec.observe.profile import summary_tables

        for table in summary_tables(profiler.summary, escape(name)):
            self.console.print(table)
        self.log(f"profile: {profiler.trace_path} (Perfetto, chrome://tracing or TensorBoard's profiler plugin), "
                 f"{profiler.trace_path.with_name(f'rank{profiler.rank}.summary.csv').name}; one of each per rank in {profiler.out_dir}")

    def summary(self, trainer, result) -> None:
        table = Table(title=f"moec train {escape(trainer.spec.name)}", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        rows = [
            ("steps", f"{result.step} / {trainer.train.steps}" + (f" (stopped by {result.interrupted})" if result.interrupted else "")),
            ("time", f"{result.seconds:.1f} s, {result.tokens_per_s:,.0f} tokens/s"
                     + (f" (after the first step; compiling took {result.compile_s:.1f} s)" if result.compile_s is not None else "")),
            ("final train loss", f"{result.final_train_loss:.4f}"),
        ]
        utilisation = _mfu(trainer, result)
        if utilisation:
            rows.append(("MFU", utilisation))
        if result.last_eval:
            rows.append(("last validation", _eval_text(result.last_eval, result.baseline_mse)))
        if math.isfinite(result.best_val):
            rows.append(("best validation loss", f"{result.best_val:.4f} (step {trainer.best_step})"))
        rows += [("run directory", str(result.run_dir)), ("plots", ", ".join(str(p) for p in result.plots) or "-")]
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        self.console.print(table)


def _console() -> Console:
    """rich's console; off a terminal (a log file, CI) rich assumes 80 columns and would cut long paths in
    the summary, so it gets 240 unless COLUMNS says otherwise (log lines are never cut: see log_line)."""
    console = Console(log_path=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(log_path=False, width=240)
    return console


def _mfu(trainer, result) -> str | None:
    """The MFU line where the device's peak is known (CUDA devices in moec.observe.mfu.PEAKS)."""
    import torch

    from moec.dtypes import compute_name
    from moec.observe.mfu import mfu

    if trainer.device.type != "cuda":
        return None
    precision = compute_name(trainer.spec.schedule.precision.compute)  # fp8: against the bf16 peak, as torchtitan
    found = mfu(result.tokens_per_s / max(trainer.dist.world_size, 1), trainer.program.manifest["flops_per_token"]["training"],
                torch.cuda.get_device_name(trainer.device), precision)
    return None if found is None else f"{found[1]:.1%} of one {found[0]}'s dense {precision} peak per device"


def log_line(console: Console, text: str) -> None:
    """A timed log line: rich's on a terminal; elsewhere (a log file, CI) one line however long, never
    cut at the 80 columns rich assumes without a terminal, and without padding."""
    if console.is_terminal:
        console.log(text)
    else:
        console.print(f"[{time.strftime('%H:%M:%S')}] {text}", soft_wrap=True, highlight=False)


def _eval_text(row: dict, baseline: float | None) -> str:
    if "val_bits_per_byte" in row:
        return f"loss {row['val_loss']:.4f} = {row['val_bits_per_byte']:.3f} bits/byte"
    if "val_bits_per_token" in row:
        return f"loss {row['val_loss']:.4f} = {row['val_bits_per_token']:.3f} bits/token"
    return f"MSE {row['val_mse']:.5f} vs {baseline:.5f} repeating the last value ({baseline / row['val_mse']:.1f}x lower)"


class _Bar:
    def __init__(self, progress, task, console, steps: int):
        self.progress, self.task, self.console = progress, task, console
        # Without a terminal (CI, a log file) the bar is drawn once at the end: log lines instead.
        self.log_every = 0 if console.is_terminal else max(1, steps // 20)

    def update(self, row: dict, last_eval: dict) -> None:
        health = summarize_health(row["moe"])
        info = f"loss {row['task_loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:,.0f} tok/s"
        if "time_s" in row:
            info += f"  time: {progress_text(row['time_s'])}"
        if row["moe"]:
            info += f"  drop {health['dropped']:.1%}  load max {health['max_load']:.2f} min {health['min_load']:.2f}"
        self.progress.update(self.task, description="train", completed=row["step"], info=info)
        if self.log_every and row["step"] % self.log_every == 0:
            log_line(self.console, f"step {row['step']}: {info}")
