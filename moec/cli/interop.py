"""``moec import hf`` / ``moec export hf``: thin wrappers over ``moec.interop``."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from moec.cli.output import print_spec_error

import_app = typer.Typer(help="Import a model from another framework as a spec + weights.", no_args_is_help=True)
export_app = typer.Typer(help="Export a spec + weights to another framework.", no_args_is_help=True)


@import_app.command("hf")
def import_hf_command(
    directory: Path = typer.Argument(..., help="An HF model directory: config.json, *.safetensors (optional), tokenizer files.",
                                     show_default=False),
    output: Path = typer.Option(..., "--output", "-o", help="The spec to write; weights go beside it (<stem>.safetensors)."),
) -> None:
    """Turn a local Hugging Face model directory into a moec spec and a safetensors weights file."""
    from moec.interop import import_hf

    if not (directory / "config.json").is_file():
        typer.echo(f"error: {directory}: no config.json (is it a Hugging Face model directory?)", err=True)
        raise typer.Exit(1)
    try:
        result = import_hf(directory, output)
    except (ValueError, KeyError) as err:  # UnsupportedConfig, WeightsError, invalid JSON; KeyError: a tensor with no place
        refuse(directory, err)
    typer.echo(f"wrote {result.spec} ({result.family})")
    if result.weights is None:
        typer.echo("no safetensors weights in the directory: the spec seed initialises the model")
    else:
        typer.echo(f"wrote {result.weights} ({result.tensors} tensors)")
    for note in result.notes:
        typer.echo(f"not imported: {note}")
    if result.nonfinite:
        shown = ", ".join(result.nonfinite[:5]) + (f" and {len(result.nonfinite) - 5} more" if len(result.nonfinite) > 5 else "")
        typer.echo(f"warning: {len(result.nonfinite)} tensor(s) hold NaN or inf values, imported as they are: {shown}", err=True)


@export_app.command("hf")
def export_hf_command(
    source: Path = typer.Argument(..., help="A training checkpoint directory (step_N with meta.json), or a spec file.",
                                  show_default=False),
    output: Path = typer.Option(..., "--output", "-o", help="The HF directory to write (config.json, model.safetensors)."),
    weights: Path = typer.Option(None, "--weights", help="With a spec: its weights file (default: <stem>.safetensors beside it)."),
) -> None:
    """Write a directory that transformers' AutoModelForCausalLM.from_pretrained loads."""
    from moec import SpecError
    from moec.interop.hf_export import NotExportable, export_hf

    try:
        spec, state = _load_source(source, weights)
        export_hf(spec, state, output)
    except SpecError as err:
        print_spec_error(err)
        raise typer.Exit(1) from None
    except (NotExportable, ValueError, FileNotFoundError) as err:
        refuse(source, err)
    typer.echo(f"wrote {output}/config.json, {output}/model.safetensors")


def refuse(source: Path, err: Exception) -> NoReturn:
    """Exit 1 with one line; a message that names its own file (damaged weights, a checkpoint) is not prefixed with ``source``."""
    from moec.interop.weights import WeightsError
    from moec.checkpoint.dcp import CheckpointError

    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    prefix = "" if isinstance(err, (WeightsError, CheckpointError)) else f"{source}: "
    typer.echo(f"error: {prefix}{text}", err=True)
    raise typer.Exit(1) from None


def _load_source(source: Path, weights: Path | None):
    """(spec, weights: a file or a state dict) from a spec file or a DCP checkpoint."""
    from moec import load_spec, load_spec_text

    if source.is_dir():
        import yaml

        from moec.checkpoint.dcp import META, load_model_state, verify_checkpoint
        from moec.compile import build_model

        meta = verify_checkpoint(source).meta  # every file against manifest.json: damage is one line naming the file
        spec = load_spec_text(yaml.safe_dump(meta["spec"], sort_keys=False), file=str(source / META))
        model = build_model(spec)
        load_model_state(source, model)
        return spec, model.state_dict()
    spec = load_spec(source)
    if weights is None:
        found = [p for p in (source.with_suffix(".safetensors"), source.with_suffix(".safetensors.index.json")) if p.exists()]
        if not found:
            raise FileNotFoundError(f"no weights file beside the spec ({source.with_suffix('.safetensors')}); pass --weights")
        weights = found[0]
    return spec, weights
