"""``moec train``: load the spec, run the trainer, report; errors become one clean message.

With ``--nproc N`` the same command runs on N processes under torch's elastic launcher; each
process (or each rank under torchrun) trains, and rank 0 alone reports.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
from pathlib import Path

import typer

from moec.cli.output import load_spec_or_exit

EXIT_ON_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


class _Interrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` may swallow it
    """SIGINT / SIGTERM outside the training loop (building, loading, plotting): stop with the signal's code."""


@contextlib.contextmanager
def _exit_cleanly_on_signals():
    def interrupted(signum, frame):
        raise _Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Interrupted as err:
        sys.stdout.flush()
        typer.echo(f"error: stopped by {err} outside the training loop (building, loading or reporting); "
                   "checkpoints already written are kept", err=True)
        raise typer.Exit(EXIT_ON_SIGNAL[str(err)]) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_train(spec_path: Path, resume, allow_spec_change: bool, run_dir, device, plots: bool, stop_at=None, nproc=None,
              init_from=None, allow_data_change: bool = False, overrides: tuple[str, ...] = (), overwrite: bool = False,
              profile: tuple[int, int] | None = None, memory_snapshot: int | None = None) -> None:
    """The training loop handles signals itself (finish the step, save); around it a signal exits 130 / 143."""
    from moec.distributed.processes import JobStopped, LaunchError, launch, launched_world_size

    spec = load_spec_or_exit(spec_path, overrides)
    if nproc is not None and launched_world_size() == 1:
        if nproc != spec.mesh.world_size:
            typer.echo(f"error: the spec's mesh has world_size {spec.mesh.world_size}, but --nproc is {nproc}", err=True)
            raise typer.Exit(1)
        options = dict(resume=resume, allow_spec_change=allow_spec_change, run_dir=run_dir, device=device, plots=plots,
                       stop_at=stop_at, init_from=init_from, allow_data_change=allow_data_change, overrides=overrides,
                       overwrite=overwrite, profile=profile, memory_snapshot=memory_snapshot)
        try:
            launch(nproc, launch_argv(spec_path, **options), shutdown_timeout_s=spec.train.collective_timeout_s)
        except JobStopped as stopped:  # rank 0 said at which step and how to resume
            raise typer.Exit(stopped.code) from None
        except LaunchError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        return
    with _exit_cleanly_on_signals():
        _run_train(spec, spec_path, resume, allow_spec_change, run_dir, device, plots, stop_at, init_from, allow_data_change,
                   overwrite, profile, memory_snapshot)


def _run_train(spec, spec_path: Path, resume, allow_spec_change: bool, run_dir, device, plots: bool, stop_at, init_from,
               allow_data_change: bool, overwrite: bool = False, profile=None, memory_snapshot=None) -> None:
    from moec.observe.display import Display
    from moec.observe.plots import plot_run
    from moec.train.errors import Aborted, TrainingError
    from moec.train.trainer import Trainer

    main = int(os.environ.get("RANK", "0")) == 0
    display = Display() if main else None
    trainer = None
    try:
        trainer = Trainer(spec, run_dir=run_dir, resume=resume, allow_spec_change=allow_spec_change, device=device, display=display,
                          init_from=init_from, allow_data_change=allow_data_change, overwrite=overwrite, profile=profile,
                          memory_snapshot=memory_snapshot)
        if resume is not None and main:
            display.log(f"resuming from {trainer.resumed_from} (step {trainer.start_step})")
        result = trainer.run(stop_at=stop_at)
    except Aborted as err:  # a second SIGINT / SIGTERM: exit with the signal's code, no traceback
        sys.stdout.flush()
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_ON_SIGNAL.get(trainer.stop_signal if trainer else "SIGINT", 130)) from None
    except (TrainingError, ValueError) as err:
        typer.echo(f"error: {err}" if main else f"error on rank {os.environ.get('RANK')}: {err}", err=True)
        raise typer.Exit(1) from None
    except OSError as err:  # the run directory or the program cache cannot be written
        typer.echo(f"error: {os_error_line(err)}", err=True)
        raise typer.Exit(1) from None
    finally:
        if trainer is not None:
            with contextlib.suppress(Exception):  # a write still in flight (an error stopped the run) completes first
                trainer.checkpoints.close()
            trainer.dist.close()
            if trainer.run_lock is not None:
                trainer.run_lock.release()
    if not main:
        return
    if plots:
        notes: list[str] = []
        try:
            result.plots = plot_run(result.run_dir, notes)
        except (OSError, ValueError) as err:  # training is done and saved; only the pictures are missing
            typer.echo(f"warning: no plots: {os_error_line(err) if isinstance(err, OSError) else err}", err=True)
        for note in notes:
            typer.echo(f"note: {note}", err=True)
    display.summary(trainer, result)
    if result.interrupted and result.interrupted != "--stop-at":
        again = " ".join(shlex.quote(str(word)) for word in (spec_path, *(o.text for o in spec.source.overrides)))
        typer.echo(f"stopped by {result.interrupted} at step {result.step}; resume with: moec train {again} --resume", err=True)
        sys.stdout.flush()
        raise typer.Exit(EXIT_ON_SIGNAL.get(result.interrupted, 1))


def launch_argv(spec_path: Path, resume, allow_spec_change, run_dir, device, plots, stop_at, init_from, allow_data_change,
                overrides=(), overwrite=False, profile=None, memory_snapshot=None) -> list[str]:
    """The ``moec`` arguments each launched process runs: this command without ``--nproc``."""
    argv = ["train", str(spec_path), *overrides]
    argv += ["--resume-from", resume] if resume is not None else []
    argv += ["--overwrite"] if overwrite else []
    argv += ["--allow-spec-change"] if allow_spec_change else []
    argv += ["--allow-data-change"] if allow_data_change else []
    argv += ["--run-dir", str(run_dir)] if run_dir is not None else []
    argv += ["--device", device] if device is not None else []
    argv += ["--stop-at", str(stop_at)] if stop_at is not None else []
    argv += ["--init-from", str(init_from)] if init_from is not None else []
    argv += ["--profile", f"{profile[0]}:{profile[1]}"] if profile is not None else []
    argv += ["--memory-snapshot", str(memory_snapshot)] if memory_snapshot is not None else []
    return argv + ([] if plots else ["--no-plots"])


def os_error_line(err: OSError) -> str:
    """``PATH: reason`` for an OSError, one line."""
    where = f" {err.filename}" if err.filename else ""
    return f"cannot write{where}: {err.strerror or err}"
