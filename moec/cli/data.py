"""``moec data prepare``: a thin wrapper over ``moec.data.prepare``."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import List, Optional

import typer

from moec.cli.output import load_spec_or_exit

data_app = typer.Typer(help="Prepare training data.", no_args_is_help=True)


@data_app.command("prepare")
def prepare_command(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="A spec whose train.data is kind: text.", show_default=False),
    overrides: Optional[List[str]] = typer.Argument(None, help="KEY=VALUE overrides of spec fields.", show_default=False,
                                                    metavar="KEY=VALUE"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory for train.bin and val.bin "
                                          "(default: data/<spec name>)."),
) -> None:
    """Tokenize the spec's text sources once into token files, and print the train.data that reads them."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    from moec.data.prepare import prepare_tokens, total_bytes
    from moec.schema.spec import path_safe

    spec = load_spec_or_exit(spec_path, tuple(overrides or ()))
    out_dir = output or Path("data") / path_safe(spec.name)
    try:
        columns = ["{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
        with Progress(*columns, transient=True) as progress:
            size = total_bytes(spec) if spec.train.data.kind == "text" else 0
            task = progress.add_task("tokenizing", total=size)
            prepared = prepare_tokens(spec, out_dir, progress=lambda done: progress.advance(task, done))
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    except OSError as err:
        typer.echo(f"error: cannot write {err.filename or out_dir}: {err.strerror or err}", err=True)
        raise typer.Exit(1) from None
    for split, path in prepared.paths.items():
        typer.echo(f"wrote {path}: {prepared.tokens[split]:,} tokens from {prepared.text_bytes[split]:,} bytes")
    data = f"{{kind: token_files, train: [{prepared.paths['train']}], val: [{prepared.paths['val']}], dtype: {prepared.dtype}}}"
    typer.echo(f"train with: moec train {spec_path} {shlex.quote('train.data=' + data)}")
