"""What a run checks before it starts from a checkpoint: which checkpoint, whether the spec still matches,
and whether an ``--init-from`` source is sound. The trainer restores the state itself."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from moec.checkpoint import dcp as ckpt
from moec.train.errors import TrainingError

# Spec fields that change how a run is observed or saved, not what it computes: a resume may change them freely.
NOT_A_CHANGE = ("train.profile", "train.checkpoint.async")


def check_init_from(path: Path) -> None:
    """Before the run directory is claimed: a missing, damaged or forged source is refused in one line."""
    from moec.interop.weights import WeightsError, tensor_shapes, weight_files

    if not path.exists():
        raise TrainingError(f"--init-from {path}: no such file or checkpoint")
    try:
        ckpt.verify_checkpoint(path) if path.is_dir() else tensor_shapes(weight_files(path))
    except (ckpt.CheckpointError, WeightsError) as err:
        raise TrainingError(f"--init-from: {err}") from None


def find_checkpoint(run_dir: Path, resume: str, log: Callable[[str], None] | None = None) -> ckpt.CheckpointInfo:
    """``latest``: the newest checkpoint, verified (a damaged one is refused); ``latest-valid``: the
    newest one that verifies, skipping damaged ones with a note; anything else: that path, verified."""
    if resume not in ("latest", "latest-valid"):
        try:
            return ckpt.verify_checkpoint(Path(resume))
        except ckpt.CheckpointError as err:
            raise TrainingError(f"cannot resume: {err}") from None
    try:
        candidates = ckpt.checkpoint_dirs(run_dir)
    except ckpt.CheckpointError as err:
        raise TrainingError(f"cannot resume: {err}") from None
    if not candidates:
        raise TrainingError(f"nothing to resume: no complete checkpoint under {ckpt.checkpoint_root(run_dir)}")
    for path in reversed(candidates):
        try:
            return ckpt.verify_checkpoint(path)
        except ckpt.CheckpointError as err:
            if resume == "latest":
                raise TrainingError(f"cannot resume: {err}; --resume-from latest-valid resumes from the newest checkpoint "
                                    "that verifies") from None
            if log is not None:
                log(f"skipping a damaged checkpoint: {err}")
    raise TrainingError(f"nothing to resume: no checkpoint under {ckpt.checkpoint_root(run_dir)} verifies")


def check_spec(meta: dict, spec, overrides: list, allow_spec_change: bool) -> None:
    """The checkpoint's spec (meta.json) against this run's: the model must match, the rest needs --allow-spec-change."""
    saved, saved_overrides, current = meta["spec"], meta.get("overrides", []), spec.model_dump(mode="json")
    note = "" if saved_overrides == overrides else (  # a different command line is a spec change: the rules below apply
        f"\n  (command-line overrides then: {' '.join(saved_overrides) or 'none'}; now: {' '.join(overrides) or 'none'})")
    model_diff = ckpt.spec_differences(saved["model"], current["model"], "model")
    if model_diff:
        raise TrainingError("cannot resume: the model section changed since the checkpoint:\n  " + "\n  ".join(model_diff) + note)
    other = [d for key in ("train", "schedule", "mesh", "sharding") for d in ckpt.spec_differences(saved[key], current[key], key)
             if not d.startswith(NOT_A_CHANGE)]
    if other and not allow_spec_change:
        raise TrainingError("cannot resume: the spec changed since the checkpoint (pass --allow-spec-change to accept):\n  "
                            + "\n  ".join(other) + note)
