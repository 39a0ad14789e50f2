"""How commands print: errors as plain grep-able lines, summaries through rich."""

from __future__ import annotations

from pathlib import Path

import typer


def print_spec_error(err) -> None:
    # Plain lines, never wrapped: editors and CI annotators parse FILE:LINE:COL.
    for issue in err.issues:
        typer.echo(f"error: {issue}", err=True)


def load_spec_or_exit(path, overrides=()):
    """The validated spec, or every error printed (one line each) and exit code 1."""
    from moec import SpecError, load_spec

    try:
        return load_spec(path, tuple(overrides))
    except SpecError as err:
        print_spec_error(err)
        raise typer.Exit(1) from None


def print_valid(path: Path, spec) -> None:
    from moec.schema.checks import estimate_params

    params = estimate_params(spec)
    typer.echo(f"{path}: ok ({spec.name}, ~{human(params)} parameters, {spec.mesh.world_size} device(s))")


def print_resolved(spec, several: bool) -> None:
    from moec.schema import resolved_yaml

    if several:
        typer.echo("---")
    typer.echo(resolved_yaml(spec), nl=False)


def human(count: float, decimals: int = 1) -> str:
    """``120908427264`` -> ``120.9B`` (``decimals`` after the point; small counts as integers)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.{decimals}f}{unit}"
    return f"{count:.0f}"
