"""``moec build``: the compiler driver behind the command."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import typer

from cli.output import print_spec_error


def run_build(spec_path: Path, output: Path | None, dump_ir: bool, render_svg: bool, disable: tuple[str, ...]) -> None:
    from moec import SpecError, load_spec
    from moec.passes import PASS_NAMES, run_pipeline

    unknown = [name for name in disable if name not in PASS_NAMES]
    if unknown:
        raise typer.BadParameter(f"unknown pass {unknown[0]!r}; passes are: {', '.join(PASS_NAMES)}", param_hint="--disable-pass")
    try:
        spec = load_spec(spec_path)
        compiled = run_pipeline(spec, disable=disable)
    except SpecError as err:
        print_spec_error(err)
        raise typer.Exit(1) from None
    except ValueError as err:  # a pass that cannot be disabled
        raise typer.BadParameter(str(err), param_hint="--disable-pass") from None
    if dump_ir:
        _dump(compiled)
    out_dir = output or Path("build") / _dir_name(spec.name)
    written = _write(compiled, out_dir, render_svg)
    _summary(spec_path, compiled, written)


def _dir_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("._") or "model"


def _dump(compiled) -> None:
    from moec.ir import print_graph

    for record in compiled.log:
        state = "skipped" if record.skipped else ("changed" if record.changed else "unchanged")
        typer.echo(f"=== after {record.name} ({record.seconds * 1e3:.2f} ms, {state}) "
                   f"added {_ops(record.added)} removed {_ops(record.removed)}")
        typer.echo(print_graph(record.graph), nl=False)


def _ops(counts: dict[str, int]) -> str:
    return "{" + ", ".join(f"{op}: {n}" for op, n in sorted(counts.items())) + "}"


def _brief(counts: dict[str, int]) -> str:
    """A table cell: the ops when few kinds changed, else a count (--dump-ir has the detail)."""
    if len(counts) <= 3:
        return ", ".join(f"{op} {n}" for op, n in sorted(counts.items())) or "-"
    return f"{sum(counts.values())} nodes of {len(counts)} ops"


def _write(compiled, out_dir: Path, render_svg: bool) -> list[Path]:
    from moec.ir import print_graph, to_dot

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"ir.txt": print_graph(compiled.graph), "graph.dot": to_dot(compiled.graph)}
    written = []
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
        written.append(out_dir / name)
    if render_svg:
        dot = shutil.which("dot")
        if dot is None:
            typer.echo("note: Graphviz 'dot' is not installed; wrote graph.dot only (apt-get install graphviz)", err=True)
        else:
            subprocess.run([dot, "-Tsvg", str(out_dir / "graph.dot"), "-o", str(out_dir / "graph.svg")], check=True)
            written.append(out_dir / "graph.svg")
    return written


def _summary(spec_path: Path, compiled, written: list[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"moec build {spec_path}", title_justify="left")
    for column in ("pass", "ms", "nodes", "added", "removed"):
        table.add_column(column, justify="right" if column in ("ms", "nodes") else "left")
    for record in compiled.log:
        ms = "skipped" if record.skipped else f"{record.seconds * 1e3:.1f}"
        table.add_row(record.name, ms, str(record.nodes), _brief(record.added), _brief(record.removed))
    console = Console(soft_wrap=True)
    console.print(table)
    fused = sum(1 for node in compiled.graph if node.op in ("moe", "spectral_moe"))
    console.print(f"{fused} fused MoE node(s); wrote " + ", ".join(str(path) for path in written))
