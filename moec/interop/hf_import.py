"""``moec import hf DIR -o SPEC``: an HF model directory -> a spec and its weights file.

The spec gets the model from ``config.json`` (see ``hf_config``) and a default ``train``
section (edit it before training). The weights are converted one source tensor at a time
and written one output shard at a time, so a large checkpoint is never held twice.
Tokenizer files, when present, are copied to ``<stem>.tokenizer/`` beside the spec.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from moec.interop.hf_config import ARCHITECTURES, check_fields, family_of, model_section, moe_layer_indices, safe_name
from moec.interop.weights import SHARD_BYTES, ShardWriter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja")


@dataclass
class Imported:
    spec: Path
    weights: Path | None  # None: the directory had no weights (the spec seed initialises)
    family: str
    tensors: int = 0


def spec_from_config(config: dict, name: str, source: str) -> tuple[dict, str]:
    """(spec mapping, family) for an HF config; raises ``UnsupportedConfig`` naming a field."""
    family = family_of(config)
    check_fields(config, family)
    model = model_section(config, family)
    seq = min(256, model["max_seq_len"])
    spec = {
        "version": 1,
        "name": safe_name(name),
        "description": f"{ARCHITECTURES[family]} imported from {source} by moec import hf.",
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


def render_spec(spec: dict, weights: Path | None) -> str:
    lines = [
        f"# {spec['description']}",
        f"# Weights: {weights.name if weights else 'none in the source directory; the spec seed initialises'}.",
        "# The train section is a placeholder: set data (the model's tokenizer is not byte-level) and the schedule.",
    ]
    return "\n".join(lines) + "\n" + yaml.dump(spec, Dumper=_NoAliases, sort_keys=False, default_flow_style=None, width=120)


class _NoAliases(yaml.SafeDumper):
    """Repeated mappings written out in full (specs are read with anchors and aliases refused)."""

    def ignore_aliases(self, data) -> bool:
        return True


def import_hf(directory: Path, spec_path: Path, shard_bytes: int = SHARD_BYTES) -> Imported:
    from moec.interop.hf_weights import Converter, source_files

    directory, spec_path = Path(directory), Path(spec_path)
    config = json.loads((directory / "config.json").read_text())
    spec, family = spec_from_config(config, spec_path.stem, directory.name)
    files = source_files(directory)
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    weights, count = None, 0
    if files:
        from safetensors import safe_open

        moe_layers = moe_layer_indices(config, family)
        experts = config.get("num_local_experts") or config.get("num_experts") or 0
        convert = Converter(family, moe_layers, experts, tied=bool(config.get("tie_word_embeddings", False)))
        writer = ShardWriter(spec_path.with_suffix(""), shard_bytes, metadata={"source": directory.name, "family": family})
        for file in files:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    for ours, tensor in convert(name, f.get_tensor(name)):
                        writer.add(ours, tensor)
                        count += 1
        convert.finish()
        weights = writer.close()
    spec_path.write_text(render_spec(spec, weights))
    present = [directory / f for f in TOKENIZER_FILES if (directory / f).exists()]
    if present:
        target = spec_path.with_name(spec_path.stem + ".tokenizer")
        target.mkdir(exist_ok=True)
        for path in present:
            shutil.copy2(path, target / path.name)
    return Imported(spec=spec_path, weights=weights, family=family, tensors=count)
