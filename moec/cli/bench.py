"""``moec bench``: the driver behind the command (the timing lives in ``moec.bench``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer

from moec.cli.output import load_spec_or_exit


def run_bench(spec_path: Path, tokens: list[int] | None, reps: int, device: str, compiled: bool, as_json: bool,
              overrides: tuple[str, ...] = (), seqs: list[int] | None = None, crossover_seqs: list[int] | None = None,
              startup: bool = False) -> None:
    from rich.console import Console

    from moec.backends.triton import usable_on
    from moec.bench import spectral
    from moec.bench.run import bench_spec, moe_layers

    spec = load_spec_or_exit(spec_path, overrides)
    if not moe_layers(spec) and not spectral.spectral_layers(spec) and not startup:
        typer.echo(f"error: {spec_path}: the model has no moe or spectral_moe layer to benchmark", err=True)
        raise typer.Exit(1)
    if spec.schedule.kernels.moe == "triton" and not usable_on(device.split(":")[0]):
        typer.echo(f"error: kernels.moe 'triton' runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (device {device})", err=True)
        raise typer.Exit(1)
    counts = tokens or [spec.train.batch * spec.train.seq_len]
    tables: dict[str, list] = {}
    with Console(stderr=True).status("benchmarking") as status:
        def progress(text: str) -> None:
            status.update(text)
        if moe_layers(spec):
            tables["moe"] = bench_spec(spec, counts, reps, device, compiled, progress=progress)
        if spectral.spectral_layers(spec):
            tables["spectral_vs_attention"] = spectral.sweep(spec, tuple(seqs or spectral.SWEEP_SEQS), reps, device, progress)
            tables["fft_vs_dft"] = spectral.crossover(spec, tuple(crossover_seqs or spectral.CROSSOVER_SEQS), reps, device, progress,
                                                      compiled)
        if startup:
            from moec.bench.startup import startup as startup_rows

            tables["startup"] = startup_rows(spec_path, overrides, reps, compiled, progress)
    if as_json:
        typer.echo(json.dumps([{"table": name, **asdict(row)} for name, rows in tables.items() for row in rows], indent=1))
        return
    for name, rows in tables.items():
        {"moe": _moe_table, "spectral_vs_attention": _sweep_table, "fft_vs_dft": _crossover_table,
         "startup": _startup_table}[name](spec, rows, reps, device)


def run_kernel_table(spec_path: Path, overrides: tuple[str, ...], device: str, as_json: bool) -> None:
    """``moec bench --kernels``: the kernel-choice table of the spec's MoE layers on ``device`` and what auto picks."""
    from rich.console import Console
    from rich.table import Table

    from moec.bench.kernel_choice import choose_moe_kernels

    spec = load_spec_or_exit(spec_path, overrides)
    choice = choose_moe_kernels(spec, device, log=lambda line: typer.echo(line, err=True))
    if as_json:
        typer.echo(json.dumps(choice.record(), indent=1))
        return
    typer.echo(choice.line())
    if not choice.layers:
        return
    table = Table(title=f"{spec.name}: kernels.moe auto, forward + backward of one layer, median ms on {device}")
    for column in ("layer", "kernel", "median ms", "vs chosen", "chosen", "source"):
        table.add_column(column, justify="left" if column in ("layer", "kernel", "source") else "right")
    for layer in choice.layers:
        best = layer.timings_ms[layer.kernel]
        for kernel, ms in sorted(layer.timings_ms.items(), key=lambda item: item[1]):
            table.add_row(layer.layer, kernel, f"{ms:.3f}", f"{ms / best:.2f}x", "*" if kernel == layer.kernel else "", layer.source)
    Console().print(table)
    for layer in choice.layers:
        typer.echo(f"{layer.layer}: {layer.key}")


def _moe_table(spec, rows, reps: int, device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{spec.name}: one MoE layer, forward + backward, median of {reps} interleaved reps on {device}")
    for column in ("layer", "tokens", "candidate", "median ms", "spread ms", "efficiency", "vs HF"):
        table.add_column(column, justify="left" if column in ("layer", "candidate") else "right")
    for row in rows:
        table.add_row(row.layer, str(row.tokens), row.name, f"{row.median_ms:.2f}", f"{row.low_ms:.2f}-{row.high_ms:.2f}",
                      f"{row.efficiency:.2f}", f"{row.vs_hf:.2f}x" if row.vs_hf else "-")
    Console().print(table)


def _spectral_table(title: str, rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("layer", "seq", "candidate", "median ms", "spread ms", "saved MiB"):
        table.add_column(column, justify="left" if column in ("layer", "candidate") else "right")
    for row in rows:
        table.add_row(row.layer, str(row.seq), row.name, f"{row.median_ms:.2f}", f"{row.low_ms:.2f}-{row.high_ms:.2f}",
                      f"{row.saved_mib:.2f}")
    Console().print(table)


def _sweep_table(spec, rows, reps: int, device: str) -> None:
    from moec.bench.spectral import growth_exponent

    _spectral_table(f"{spec.name}: spectral MoE block against an attention block of width {spec.model.d_model}, "
                    f"forward + backward, median of {reps} interleaved reps on {device}", rows)
    for name in ("spectral_moe", "attention"):
        exponent = growth_exponent(rows, name)
        if exponent is not None:
            typer.echo(f"{name}: time grows as seq^{exponent:.2f}")


def _crossover_table(spec, rows, reps: int, device: str) -> None:
    from moec.backends.torch.codegen_moe import DFT_MAX_SEQ
    from moec.bench.spectral import crossover_seq

    _spectral_table(f"{spec.name}: the spectral MoE block with the DFT as matmuls and with torch.fft, median of {reps} reps "
                    f"on {device}", rows)
    for suffix in sorted({row.name.removeprefix("spectral_moe dft").removeprefix("spectral_moe fft") for row in rows}):
        found, what = crossover_seq(rows, suffix), suffix.strip() or "eager"
        typer.echo(f"{what}: torch.fft is faster from seq {found} on" if found else f"{what}: the DFT was faster at the longest measured length")
    typer.echo(f"(kernels.spectral_moe auto uses the DFT up to seq {DFT_MAX_SEQ})")


def _startup_table(spec, rows, reps: int, device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{spec.name}: start-up (build: median of {reps}; first forward + backward of the whole model in a "
                        "new process, imports not counted)")
    table.add_column("what")
    table.add_column("seconds", justify="right")
    for row in rows:
        table.add_row(row.name, f"{row.seconds:.3f}")
    Console().print(table)
