"""``moec``: the command line. Commands stay thin; the work is in the ``moec`` package.

Heavy imports (moec, torch) happen inside the commands so that ``moec --help`` is instant.
Exit codes: 0 success, 1 a spec or run error (one clean message per problem), 2 usage.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    name="moec",
    help="Compile Mixture-of-Experts models from one YAML spec.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"moec {version('moec')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Compile Mixture-of-Experts models from one YAML spec."""


OVERRIDES_HELP = "KEY=VALUE overrides of spec fields, after the spec: train.steps=50 model.blocks[0].layers[1].experts=8."


@app.command()
def validate(
    specs: List[str] = typer.Argument(..., help="Spec files to check, then KEY=VALUE overrides (applied to each).",
                                      show_default=False, metavar="SPECS... [KEY=VALUE]..."),
    resolved: bool = typer.Option(False, "--resolved", help="Print each spec with every default filled in."),
) -> None:
    """Check specs; print every problem as FILE:LINE:COL: KEY: MESSAGE."""
    from moec import SpecError, load_spec
    from moec.cli.output import print_resolved, print_spec_error, print_valid
    from moec.schema.overrides import is_override

    overrides = [arg for arg in specs if is_override(arg)]
    paths = [Path(arg) for arg in specs if not is_override(arg)]
    if not paths:
        raise typer.BadParameter("no spec file given (only KEY=VALUE overrides)", param_hint="SPECS")
    failed = 0
    for path in paths:
        try:
            spec = load_spec(path, overrides)
        except SpecError as err:
            print_spec_error(err)
            failed += 1
            continue
        if resolved:
            print_resolved(spec, several=len(paths) > 1)
        else:
            print_valid(path, spec)
    if failed:
        typer.echo(f"{failed} of {len(paths)} spec(s) invalid", err=True)
        raise typer.Exit(1)


@app.command()
def build(
    spec: Path = typer.Argument(..., help="The spec to compile.", show_default=False),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False, metavar="KEY=VALUE"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output directory (default: build/<spec name>)."),
    dump_ir: bool = typer.Option(False, "--dump-ir", help="Print the graph after every pass, with its time and op changes."),
    graph: bool = typer.Option(False, "--graph", help="Also render graph.dot to graph.svg (needs Graphviz's dot)."),
    disable_pass: List[str] = typer.Option([], "--disable-pass", help="Skip a pass by name (repeatable)."),
    device: Optional[str] = typer.Option(None, "--device", help="Where kernels.moe auto times its candidates: cpu or cuda "
                                         "(default: cuda when torch sees one, else cpu)."),
) -> None:
    """Compile a spec: write model.py, manifest.json, ir.txt and graph.dot; print a summary."""
    from moec.cli.build import run_build

    run_build(spec, output, dump_ir=dump_ir, render_svg=graph, disable=tuple(disable_pass), overrides=tuple(overrides or ()),
              device=device)


@app.command()
def train(
    spec: Path = typer.Argument(..., help="The spec to train.", show_default=False),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False, metavar="KEY=VALUE"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run directory's run from its newest checkpoint "
                                "(refused if that checkpoint does not verify)."),
    resume_from: Optional[str] = typer.Option(
        None, "--resume-from", metavar="PATH|latest-valid", help="Continue from this checkpoint directory, or from the "
        "newest checkpoint of the run directory that verifies (latest-valid)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in a run directory that holds a run: deletes "
                                   "its metrics.jsonl, checkpoints and plots first."),
    stop_at: Optional[int] = typer.Option(
        None, "--stop-at", min=1, help="Stop after this step with a checkpoint, as if interrupted; the schedule still follows train.steps.",
    ),
    allow_spec_change: bool = typer.Option(False, "--allow-spec-change", help="Resume even though train/schedule fields changed."),
    allow_data_change: bool = typer.Option(False, "--allow-data-change", help="Resume even though the training data's bytes changed."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default: the spec's train.checkpoint.dir)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots at the end."),
    nproc: Optional[int] = typer.Option(
        None, "--nproc", min=1, help="Start this many local processes with torch's elastic launcher (the spec's mesh.world_size).",
    ),
    init_from: Optional[Path] = typer.Option(
        None, "--init-from", help="Start from these weights: a safetensors file (moec import hf) or a checkpoint directory.",
    ),
    profile: Optional[str] = typer.Option(
        None, "--profile", metavar="START:END", help="torch.profiler over steps START..END (from 1, both included; overrides "
        "train.profile): a trace and a summary per rank in <run>/profile."),
    memory_snapshot: Optional[int] = typer.Option(
        None, "--memory-snapshot", min=1, metavar="STEP", help="CUDA: record the allocator's history and dump a snapshot "
        "after this step to <run>/memory (PyTorch's memory_viz opens it)."),
) -> None:
    """Train a spec: metrics.jsonl, checkpoints and plots under the run directory."""
    from moec.cli.train import run_train
    from moec.observe.profile import parse_window

    try:
        window = parse_window(profile) if profile is not None else None
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--profile") from None
    if overwrite and (resume or resume_from):
        raise typer.BadParameter("--overwrite starts afresh; it cannot be combined with --resume / --resume-from",
                                 param_hint="--overwrite")
    run_train(spec, overrides=tuple(overrides or ()), resume=resume_from or ("latest" if resume else None), overwrite=overwrite,
              allow_spec_change=allow_spec_change, run_dir=run_dir, device=device, plots=plots,
              stop_at=stop_at, nproc=nproc, init_from=init_from, allow_data_change=allow_data_change, profile=window,
              memory_snapshot=memory_snapshot)


@app.command()
def inspect(
    spec: Path = typer.Argument(..., help="The spec whose MoE layer to report.", show_default=False),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False, metavar="KEY=VALUE"),
    layer: Optional[str] = typer.Option(None, "--layer", help="The MoE layer, e.g. blocks.1.moe (default: the first)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", min=1, help="Random input tokens (default: train.seq_len; "
                                         "more: a multiple of it, as a batch of sequences)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Weights from a checkpoint directory or safetensors "
                                              "file (default: the spec seed's)."),
) -> None:
    """Report one MoE layer on a random input: shapes, forward time, tokens per expert, load-balance loss."""
    from moec.cli.inspect_layer import run_inspect

    run_inspect(spec, tuple(overrides or ()), layer, tokens, checkpoint)


@app.command()
def plot(run: Path = typer.Argument(..., help="A run directory with metrics.jsonl.", show_default=False)) -> None:
    """Draw loss, expert-utilisation and throughput PNGs for a run."""
    from moec.observe.plots import plot_run

    if not (run / "metrics.jsonl").is_file():
        typer.echo(f"error: {run}: no metrics.jsonl (is it a run directory?)", err=True)
        raise typer.Exit(1)
    notes: list[str] = []
    try:
        written = plot_run(run, notes)
    except (ValueError, OSError, KeyError) as err:  # a damaged metrics.jsonl, an unwritable run directory
        for note in notes:
            typer.echo(f"note: {note}", err=True)
        typer.echo(f"error: {_plot_error(run, err)}", err=True)
        raise typer.Exit(1) from None
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    for path in written:
        typer.echo(f"wrote {path}")


def _plot_error(run: Path, err: Exception) -> str:
    if isinstance(err, OSError):
        return f"cannot write plots in {run}: {err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
    if isinstance(err, KeyError):
        return f"{run / 'metrics.jsonl'}: a row lacks the field {err}"
    return str(err)


@app.command()
def bench(
    spec: Path = typer.Argument(..., help="The spec whose MoE layers to time.", show_default=False),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False, metavar="KEY=VALUE"),
    tokens: Optional[List[int]] = typer.Option(None, "--tokens", help="Tokens per step (repeatable); default batch * seq_len."),
    seqs: Optional[List[int]] = typer.Option(None, "--seq", help="Spectral MoE against attention: sequence lengths (repeatable); "
                                             "default 256 .. 8192."),
    crossover_seqs: Optional[List[int]] = typer.Option(None, "--crossover-seq", help="DFT against torch.fft: sequence lengths "
                                                       "(repeatable); default 16 .. 512."),
    reps: int = typer.Option(7, "--reps", min=1, help="Interleaved repetitions; medians are reported."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    compiled: bool = typer.Option(True, "--compile/--no-compile", help="Also time moec under torch.compile."),
    json_out: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
    startup: bool = typer.Option(False, "--startup", help="Also time building the program and the whole model's first "
                                 "training step in new processes, with cold and then warm compile caches."),
    kernels: bool = typer.Option(False, "--kernels", help="Only show the table kernels.moe auto chooses from on --device: "
                                 "each candidate kernel's time per MoE layer and the choice (timed now where the table "
                                 "lacks the spec's shapes)."),
) -> None:
    """Time each MoE layer of a spec against dense GEMMs, HF grouped_mm experts and a per-expert loop; each spectral
    MoE layer against attention as the sequence grows, and with the DFT against torch.fft; with --startup, the build
    and the first step's compile, cold and warm; with --kernels, kernels.moe auto's table."""
    from moec.cli.bench import run_bench, run_kernel_table

    if kernels:
        run_kernel_table(spec, tuple(overrides or ()), device, json_out)
        return
    run_bench(spec, tokens, reps, device, compiled, json_out, tuple(overrides or ()), seqs, crossover_seqs, startup)


@app.command()
def schema(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
) -> None:
    """Print the JSON Schema of a spec, for editor autocompletion (see docs/editor.md)."""
    import json

    from moec import json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {output}", err=True)


def _register_interop() -> None:
    from moec.cli.interop import export_app, import_app

    app.add_typer(import_app, name="import")
    app.add_typer(export_app, name="export")


def _register_data() -> None:
    from moec.cli.data import data_app

    app.add_typer(data_app, name="data")


def _register_inference() -> None:
    from moec.cli.infer import evaluate, generate, serve

    app.command("generate")(generate)
    app.command("eval")(evaluate)
    app.command("serve")(serve)


_register_interop()
_register_data()
_register_inference()


def _exit_on_signal(signum, frame) -> None:
    """Outside a command's own handling (``moec train`` saves first), SIGINT / SIGTERM end the process
    with 130 / 143 at once: no KeyboardInterrupt traceback, and never a death by the signal, even when
    a second Ctrl-C lands while the process is already exiting."""
    import os
    import signal
    import sys

    try:
        sys.stdout.flush()
        sys.stderr.write(f"error: stopped by {signal.Signals(signum).name}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(130 if signum == signal.SIGINT else 143)


def main() -> None:
    import signal
    import sys

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_on_signal)
    try:
        app(args=sys.argv[1:], prog_name="moec")
    finally:
        # The command is done and has handled any signal itself. While the interpreter tears down,
        # Python puts back the default handlers (a late Ctrl-C would kill the process by SIGINT,
        # losing the exit status) but leaves SIG_IGN alone; a mask would not do, since torch's
        # threads would take the signal.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    main()
