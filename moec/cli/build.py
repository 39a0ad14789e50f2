"""``moec build``: the compiler driver behind the command."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import typer

from moec.cli.output import human, load_spec_or_exit, print_spec_error


def run_build(spec_path: Path, output: Path | None, dump_ir: bool, render_svg: bool, disable: tuple[str, ...],
              overrides: tuple[str, ...] = (), device: str | None = None) -> None:
    from moec import SpecError
    from moec.bench.kernel_choice import choose_moe_kernels, default_device
    from moec.compile import compile_spec
    from moec.passes import PipelineUsageError
    from moec.schema.spec import path_safe

    if device not in (None, "cpu", "cuda"):
        raise typer.BadParameter(f"unknown device {device!r}; use cpu or cuda", param_hint="--device")
    spec = load_spec_or_exit(spec_path, overrides)
    choice = choose_moe_kernels(spec, device or default_device(), log=lambda line: typer.echo(line, err=True))
    if choice.worth_saying:
        typer.echo(choice.line())
    try:
        program = compile_spec(spec, disable=disable, kernel_choice=choice)
    except SpecError as err:
        print_spec_error(err)
        raise typer.Exit(1) from None
    except PipelineUsageError as err:  # an unknown pass, or one that cannot be disabled
        raise typer.BadParameter(str(err), param_hint="--disable-pass") from None
    if dump_ir:
        _dump(program)
    out_dir = output or Path("build") / path_safe(spec.name, fallback="model")
    try:
        written = _write(program, out_dir, render_svg)
        _check_constructs(spec, program, out_dir)
    except OSError as err:  # -o under a file, a read-only or full disk, an unwritable MOEC_CACHE_DIR
        where = f"{err.filename}: " if err.filename else f"{out_dir}: "
        typer.echo(f"error: cannot write the program: {where}{err.strerror or err}", err=True)
        raise typer.Exit(1) from None
    _summary(spec_path, program, written)


def _dump(program) -> None:
    from moec.ir import print_graph

    for record in program.log:
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


def _write(program, out_dir: Path, render_svg: bool) -> list[Path]:
    import json

    from moec.ir import print_graph, to_dot

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "model.py": program.source,
        "model_support.py": program.support_source,
        "parallel.py": program.parallel_source,
        "manifest.json": json.dumps(program.manifest, indent=2) + "\n",
        "ir.txt": print_graph(program.graph),
        "graph.dot": to_dot(program.graph),
    }
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


def _check_constructs(spec, program, out_dir: Path) -> None:
    """Build the written model.py on the meta device (nothing allocated): proves it constructs."""
    from moec.compile import build_model

    model = build_model(spec, device="meta", program=program, path=out_dir / "model.py")
    count = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert count == program.manifest["parameters"]["total"], "generated model disagrees with the graph"


def _summary(spec_path: Path, compiled, written: list[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    from rich.markup import escape

    table = Table(title=f"moec build {escape(str(spec_path))}", title_justify="left")
    for column in ("pass", "ms", "nodes", "added", "removed"):
        table.add_column(column, justify="right" if column in ("ms", "nodes") else "left")
    for record in compiled.log:
        ms = "skipped" if record.skipped else f"{record.seconds * 1e3:.1f}"
        table.add_row(record.name, ms, str(record.nodes), _brief(record.added), _brief(record.removed))
    console = Console(soft_wrap=True)
    console.print(table)
    console.print(_facts_table(compiled.manifest, compiled.graph))
    if compiled.manifest["pipeline_stages"]:
        console.print(_stages_table(compiled.manifest))
    for line in _placement_lines(compiled):
        console.print(escape(line))
    console.print("wrote " + ", ".join(escape(str(path)) for path in written))


def _placement_lines(program) -> list[str]:
    """Which experts live on which expert-parallel rank, and how many move if ep grows by one."""
    from moec.backends.parallel.plan import parallel_plan, placement_report
    from moec.compile import expert_owners

    experts = expert_owners(program.graph)
    return placement_report(program.spec, parallel_plan(program.spec, tuple(experts)), max(experts.values(), default=0))


def _stages_table(manifest: dict):
    """The pipeline split: blocks, FLOPs, parameters and memory per device of each stage."""
    from rich.table import Table

    table = Table(title="pipeline stages (balanced by forward FLOPs per token)", title_justify="left")
    for column in ("stage", "blocks", "FLOPs/token fwd", "parameters", "memory/device"):
        table.add_column(column, justify="right")
    for row in manifest["pipeline_stages"]:
        first, last = row["blocks"]
        table.add_row(str(row["stage"]), f"{first}-{last} ({last - first + 1})", human(row["forward_flops_per_token"], 2),
                      human(row["parameters"], 2), f"{row['bytes_per_device'] / 2**30:.2f} GiB")
    return table


def _facts_table(manifest: dict, graph):
    from rich.table import Table

    params, flops, memory = manifest["parameters"], manifest["flops_per_token"], manifest["memory_per_device"]
    fused = sum(1 for node in graph if node.op in ("moe", "spectral_moe"))
    mesh = " x ".join(f"{axis} {size}" for axis, size in memory["mesh"].items())
    table = Table(show_header=False, title="model", title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("parameters", f"{human(params['total'], 2)} ({params['total']:,})"),
        ("active per token", f"{human(params['active_per_token'], 2)}"),
        ("fused MoE nodes", str(fused)),
        (f"FLOPs/token fwd (S={flops['seq_len']})", f"{human(flops['forward'], 2)}"),
        (f"memory/device, {mesh}", f"{memory['total_gib']:.2f} GiB (params + grads + AdamW)"),
    ]
    context = manifest.get("context_parallel")
    if context:  # sharding.sequence: what one rank sends over the cp group per sequence, forward and backward
        sent = context["bytes_sent_per_rank_per_sequence"]["training"]
        calls = ", ".join(f"{count} {kind}" for kind, count in context["collectives_per_forward"].items())
        size = f"{sent / 2**20:.2f} MiB" if sent >= 2**20 else f"{sent / 2**10:.1f} KiB"
        rows.append((f"cp {context['size']} sent/rank/sequence", f"{size} (forward: {calls})"))
    for row in rows:
        table.add_row(*row)
    return table
