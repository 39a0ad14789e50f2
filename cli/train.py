"""``moec train``: load the spec, run the trainer, report; errors become one clean message."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from cli.output import print_spec_error

EXIT_ON_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


def run_train(spec_path: Path, resume, allow_spec_change: bool, run_dir, device, plots: bool, stop_at=None, nproc=None,
              init_from=None) -> None:
    from moec import SpecError, load_spec
    from moec.runtime.display import Display
    from moec.runtime.distributed import LaunchError, launch, launched_world_size
    from moec.runtime.plots import plot_run
    from moec.runtime.trainer import Trainer, TrainingError

    try:
        spec = load_spec(spec_path)
    except SpecError as err:
        print_spec_error(err)
        raise typer.Exit(1) from None
    if nproc is not None and launched_world_size() == 1:
        if nproc != spec.mesh.world_size:
            typer.echo(f"error: the spec's mesh has world_size {spec.mesh.world_size}, but --nproc is {nproc}", err=True)
            raise typer.Exit(1)
        _launch(launch, LaunchError, nproc, spec_path, resume, allow_spec_change, run_dir, device, plots, stop_at, init_from)
        return
    main = int(os.environ.get("RANK", "0")) == 0
    display = Display() if main else None
    try:
        trainer = Trainer(spec, run_dir=run_dir, resume=resume, allow_spec_change=allow_spec_change, device=device, display=display,
                          init_from=init_from)
        if resume is not None and main:
            display.log(f"resuming from {trainer.resumed_from} (step {trainer.start_step})")
        result = trainer.run(stop_at=stop_at)
    except (TrainingError, ValueError) as err:
        typer.echo(f"error: {err}" if main else f"error on rank {os.environ.get('RANK')}: {err}", err=True)
        raise typer.Exit(1) from None
    finally:
        if "trainer" in locals():
            trainer.dist.close()
    if not main:
        return
    if plots:
        result.plots = plot_run(result.run_dir)
    display.summary(trainer, result)
    if result.interrupted and result.interrupted != "--stop-at":
        typer.echo(f"stopped by {result.interrupted} at step {result.step}; resume with: moec train {spec_path} --resume", err=True)
        sys.stdout.flush()
        raise typer.Exit(EXIT_ON_SIGNAL.get(result.interrupted, 1))


def _launch(launch, LaunchError, nproc, spec_path, resume, allow_spec_change, run_dir, device, plots, stop_at, init_from) -> None:
    """``moec train --nproc N``: the same command on N processes under torch's elastic launcher."""
    argv = ["train", str(spec_path)]
    argv += ["--resume", resume] if resume is not None else []
    argv += ["--allow-spec-change"] if allow_spec_change else []
    argv += ["--run-dir", str(run_dir)] if run_dir is not None else []
    argv += ["--device", device] if device is not None else []
    argv += ["--stop-at", str(stop_at)] if stop_at is not None else []
    argv += ["--init-from", str(init_from)] if init_from is not None else []
    argv += [] if plots else ["--no-plots"]
    try:
        launch(nproc, argv)
    except LaunchError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
