"""``moec bench``: the driver behind the command (the timing lives in ``moec.bench``)."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.output import load_spec_or_exit


def run_bench(spec_path: Path, tokens: list[int] | None, reps: int, device: str, compiled: bool, as_json: bool,
              overrides: tuple[str, ...] = ()) -> None:
    from rich.console import Console
    from rich.table import Table

    from moec.backends.triton import usable_on
    from moec.bench.run import bench_spec, moe_layers, rows_json

    spec = load_spec_or_exit(spec_path, overrides)
    if not moe_layers(spec):
        typer.echo(f"error: {spec_path}: the model has no moe layer to benchmark", err=True)
        raise typer.Exit(1)
    if spec.schedule.kernels.moe == "triton" and not usable_on(device.split(":")[0]):
        typer.echo(f"error: kernels.moe 'triton' runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (device {device})", err=True)
        raise typer.Exit(1)
    counts = tokens or [spec.train.batch * spec.train.seq_len]
    console = Console(stderr=True)
    with console.status("benchmarking") as status:
        rows = bench_spec(spec, counts, reps, device, compiled, progress=lambda text: status.update(text))
    if as_json:
        typer.echo(rows_json(rows))
        return
    table = Table(title=f"{spec.name}: one MoE layer, forward + backward, median of {reps} interleaved reps on {device}")
    for column in ("layer", "tokens", "candidate", "median ms", "spread ms", "efficiency", "vs HF"):
        table.add_column(column, justify="left" if column in ("layer", "candidate") else "right")
    for row in rows:
        table.add_row(row.layer, str(row.tokens), row.name, f"{row.median_ms:.2f}", f"{row.low_ms:.2f}-{row.high_ms:.2f}",
                      f"{row.efficiency:.2f}", f"{row.vs_hf:.2f}x" if row.vs_hf else "-")
    Console().print(table)
