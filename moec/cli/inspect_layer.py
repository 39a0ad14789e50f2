"""``moec inspect``: the moe_basics seed's report for one MoE layer (moec.observe.inspect_layer)."""

from __future__ import annotations

from pathlib import Path

import typer

from moec.cli.output import load_spec_or_exit


def run_inspect(spec_path: Path, overrides: tuple[str, ...], layer: str | None, tokens: int | None, checkpoint: Path | None) -> None:
    from moec.observe.inspect_layer import InspectError, inspect_layer

    spec = load_spec_or_exit(spec_path, overrides)
    try:
        report = inspect_layer(spec, layer=layer, tokens=tokens, checkpoint=checkpoint)
    except (InspectError, ValueError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo("\n".join(report.lines()))
