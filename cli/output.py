"""How commands print: errors as plain grep-able lines, summaries through rich."""

from __future__ import annotations

from pathlib import Path

import typer


def print_spec_error(err) -> None:
    # Plain lines, never wrapped: editors and CI annotators parse FILE:LINE:COL.
    for issue in err.issues:
        typer.echo(f"error: {issue}", err=True)


def print_valid(path: Path, spec) -> None:
    from moec.schema.checks import estimate_params

    params = estimate_params(spec)
    typer.echo(f"{path}: ok ({spec.name}, ~{_human(params)} parameters, {spec.mesh.world_size} device(s))")


def print_resolved(spec, several: bool) -> None:
    from moec.schema import resolved_yaml

    if several:
        typer.echo("---")
    typer.echo(resolved_yaml(spec), nl=False)


def _human(count: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)
