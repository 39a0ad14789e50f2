"""``moec import hf DIR -o SPEC``: an HF model directory -> a spec and its weights file.

The spec gets the model from ``config.json`` (see ``hf_config``) and a default ``train``
section (edit it before training). The weights are converted one source tensor at a time
and written one output shard at a time, so a large checkpoint is never held twice.
Tokenizer files, when present, are copied to ``<stem>.tokenizer/`` beside the spec.

What cannot be imported faithfully is refused before anything is written: pickled weights
(never unpickled), damaged safetensors files, a config whose sizes the tensors contradict,
one that makes an invalid spec. Tensors holding NaN or inf are imported and listed. A DeepSeek-V3
checkpoint's multi-token prediction layers, when it holds them, become the spec's ``head.mtp``
(``moec.interop.mtp_layers``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import yaml

from moec.interop.errors import UnsupportedConfig
from moec.interop.families import Family
from moec.interop.families.base import expert_count
from moec.interop.hf_config import check_fields, family_of, model_section, moe_layer_indices, safe_name
from moec.interop.mtp_layers import IMPORTED_WEIGHT, checkpoint_depth
from moec.interop.weights import SHARD_BYTES, ShardWriter, WeightsError, open_safetensors, tensor_shapes
from moec.schema.errors import format_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja")
EMBED = "model.embed_tokens.weight"


@dataclass
class Imported:
    spec: Path
    weights: Path | None  # None: the directory had no weights (the spec seed initialises)
    family: str  # the HF model_type
    tensors: int = 0
    nonfinite: list[str] = field(default_factory=list)  # source tensors holding NaN or inf (imported as they are)
    notes: list[str] = field(default_factory=list)  # what the import leaves out on purpose (Family.import_notes)


def spec_from_config(config: dict, name: str, source: str) -> tuple[dict, Family]:
    """(spec mapping, family) for an HF config; raises ``UnsupportedConfig`` naming a field."""
    family = family_of(config)
    check_fields(config, family)
    model = model_section(config, family)
    seq = min(256, model["max_seq_len"])
    spec = {
        "version": 1,
        "name": safe_name(name),
        "description": f"{family.architecture} imported from {source} by moec import hf.",
        "model": model,
        "train": {
            "seed": 0,
            "steps": 100,
            "batch": 8,
            "seq_len": seq,
            "optimizer": {"lr": 1.0e-5},
            "data": {"kind": "random_tokens"},
        },
    }
    return spec, family


def render_spec(spec: dict, weights: Path | None, notes: list[str] = ()) -> str:
    lines = [
        f"# {spec['description']}",
        f"# Weights: {weights.name if weights else 'none in the source directory; the spec seed initialises'}.",
        "# The train section is a placeholder: set data (the model's tokenizer is not byte-level) and the schedule.",
    ] + [f"# Not imported: {note}" for note in notes]
    return "\n".join(lines) + "\n" + yaml.dump(spec, Dumper=_NoAliases, sort_keys=False, default_flow_style=None, width=120)


class _NoAliases(yaml.SafeDumper):
    """Repeated mappings written out in full (specs are read with anchors and aliases refused)."""

    def ignore_aliases(self, data) -> bool:
        return True


def import_hf(directory: Path, spec_path: Path, shard_bytes: int = SHARD_BYTES) -> Imported:
    """Everything is checked before anything is written: a refusal (``UnsupportedConfig``, ``WeightsError``,
    ``KeyError``) leaves nothing at ``spec_path`` or beside it."""
    from moec.interop.hf_weights import source_files

    directory, spec_path = Path(directory), Path(spec_path)
    config = read_config(directory)
    spec, family = spec_from_config(config, spec_path.stem, directory.name)
    files = source_files(directory)
    found = tensor_shapes(files)
    mtp_depth = checkpoint_depth(config, found, family)
    if mtp_depth:  # the checkpoint holds DeepSeek-V3's multi-token prediction layers: moec's head.mtp modules
        spec["model"]["head"]["mtp"] = {"depth": mtp_depth, "weight": IMPORTED_WEIGHT}
    check_embedding(config, found)
    check_shapes(found, config, family, validated(spec))
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    weights, count, nonfinite = _write_weights(files, config, family, spec_path, directory.name, shard_bytes, mtp_depth)
    notes = family.import_notes(config, mtp_imported=bool(mtp_depth))
    spec_path.write_text(render_spec(spec, weights, notes))
    _copy_tokenizer(directory, spec_path)
    return Imported(spec=spec_path, weights=weights, family=family.name, tensors=count, nonfinite=nonfinite, notes=notes)


def read_config(directory: Path) -> dict:
    config = json.loads((directory / "config.json").read_text())
    if not isinstance(config, dict):
        raise UnsupportedConfig(f"config.json holds a JSON {type(config).__name__}, not an object")
    return config


def validated(spec: dict):
    """The spec as moec loads it; an invalid one is refused now, not when training starts."""
    from moec import SpecError, load_spec_text

    try:
        return load_spec_text(render_spec(spec, None), file="config.json")
    except SpecError as err:
        issue = err.issues[0]
        raise UnsupportedConfig(f"config.json makes a spec moec refuses: {format_path(issue.path)}: {issue.message}") from None


def check_embedding(config: dict, found: dict) -> None:
    """vocab_size and hidden_size against the embedding, before the spec is validated (which a wrong size may fail)."""
    if EMBED in found:
        file, shape = found[EMBED]
        _agree(file, EMBED, shape, (config.get("vocab_size"), config.get("hidden_size")), " (vocab_size, hidden_size)")


def check_shapes(found: dict, config: dict, family: Family, spec) -> None:
    """Every tensor against the shape the config implies (the moec model built on the meta device, in HF names)."""
    from moec.compile import build_model
    from moec.interop.hf_weights import hf_shapes

    if not found:
        return
    expected = hf_shapes(family, moe_layer_indices(config, family), build_model(spec, device="meta"))
    for name, (file, shape) in found.items():
        if name in expected:  # others (a fused expert layout, a stored tied head) are checked as they are converted
            _agree(file, name, shape, expected[name])


def _agree(file: Path, name: str, shape: tuple, expected: tuple, fields: str = "") -> None:
    if tuple(shape) != tuple(expected):
        raise WeightsError(f"{file}: tensor {name} has shape {list(shape)}, but config.json implies {list(expected)}{fields}")


def _write_weights(files: list[Path], config: dict, family: Family, spec_path: Path, source: str, shard_bytes: int,
                   mtp_depth: int = 0):
    """(weights file or None, tensors written, names of source tensors holding NaN / inf); on any error no shard is left."""
    from moec.interop.hf_weights import Converter

    if not files:
        return None, 0, []
    convert = Converter(family, moe_layer_indices(config, family), expert_count(config), tied=bool(config.get("tie_word_embeddings", False)),
                        mtp_depth=mtp_depth)
    writer = ShardWriter(spec_path.with_suffix(""), shard_bytes, metadata={"source": source, "family": family.name})
    count, nonfinite = 0, []
    try:
        for name, tensor in _source_tensors(files):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                nonfinite.append(name)
            for ours, converted in convert(name, tensor):
                writer.add(ours, converted)
                count += 1
        convert.finish()
        return writer.close(), count, nonfinite
    except BaseException:
        writer.abort()
        raise


def _source_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with open_safetensors(file) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _copy_tokenizer(directory: Path, spec_path: Path) -> None:
    present = [directory / f for f in TOKENIZER_FILES if (directory / f).exists()]
    if present:
        target = spec_path.with_name(spec_path.stem + ".tokenizer")
        target.mkdir(exist_ok=True)
        for path in present:
            shutil.copy2(path, target / path.name)
