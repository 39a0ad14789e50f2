"""``moec.load_trained``: a run directory or a checkpoint directory -> the built model and its spec.

Users never touch the DCP layout: the spec comes from the checkpoint's meta.json (the
resolved spec the run trained), the program is compiled from it, and the weights are read
with the same verified loader the trainer resumes with. ``load_served`` also takes the spec
file of ``moec import hf``, with its weights and tokenizer beside it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from moec.checkpoint import dcp as ckpt
from moec.compile import build_model
from moec.schema import load_spec, load_spec_text


def find_checkpoint(path: Path) -> ckpt.CheckpointInfo:
    """``path`` itself when it is a checkpoint, else the newest checkpoint under the run that verifies."""
    path = Path(path)
    if not path.exists():
        raise ckpt.CheckpointError(f"{path}: no such run or checkpoint directory")
    if (path / ckpt.MANIFEST).exists() or (path / ckpt.META).exists():
        return ckpt.verify_checkpoint(path)
    candidates = ckpt.checkpoint_dirs(path)
    if not candidates:
        raise ckpt.CheckpointError(f"{path}: no checkpoint under {ckpt.checkpoint_root(path)} (is it a run directory?)")
    errors = []
    for candidate in reversed(candidates):
        try:
            return ckpt.verify_checkpoint(candidate)
        except ckpt.CheckpointError as err:  # a damaged newest checkpoint: the one before it
            errors.append(str(err))
    raise ckpt.CheckpointError(f"{path}: no checkpoint verifies ({errors[0]})")


def load_trained(path, device="cpu"):
    """``(model, spec)``: the generated model with the newest valid checkpoint's weights, in eval mode.

    ``path``: a run directory (``runs/<name>``) or one checkpoint (``runs/<name>/checkpoints/step_...``).
    ``model.checkpoint`` is the :class:`CheckpointInfo` it came from (path, step, meta.json).
    Raises :class:`moec.checkpoint.dcp.CheckpointError` (a ValueError) with a one-line message.
    """
    info = find_checkpoint(Path(path))
    spec = load_spec_text(yaml.safe_dump(info.meta["spec"], sort_keys=False), file=str(info.path / ckpt.META))
    model = build_model(spec, device=device)
    ckpt.load_model_state(info.path, model)
    model.checkpoint = info
    return model.eval(), spec


def load_served(path):
    """``(model, spec, codec)`` for ``moec serve``: a run or checkpoint (with its data's codec), or a spec file
    with its weights beside it (``<stem>.safetensors`` or ``.safetensors.index.json``) and, when ``moec import hf``
    copied one, its tokenizer (``<stem>.tokenizer/tokenizer.json``, whose chat template the chat route renders)."""
    from moec.serve.codec import TokenizerCodec, codec_for

    path = Path(path)
    if not path.is_file():
        model, spec = load_trained(path)
        return model, spec, codec_for(spec)
    spec = load_spec(path)
    found = [p for p in (path.with_suffix(".safetensors"), path.with_suffix(".safetensors.index.json")) if p.exists()]
    if not found:
        raise ckpt.CheckpointError(f"{path}: no weights beside the spec ({path.with_suffix('.safetensors')})")
    model = build_model(spec, weights=found[0]).eval()
    model.checkpoint = None
    tokenizer = path.with_name(path.stem + ".tokenizer") / "tokenizer.json"
    return model, spec, TokenizerCodec(str(tokenizer)) if tokenizer.is_file() else codec_for(spec)
