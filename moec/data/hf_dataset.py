"""``kind: hf_dataset``: the text column of local Hugging Face dataset files, read through ``datasets``.

Parquet, arrow and json / jsonl files (``train`` and ``val`` lists of paths or globs) are loaded
with ``datasets.load_dataset`` offline (``HF_DATASETS_OFFLINE``; nothing is downloaded) into
memory, with its cache in a temporary directory that is removed afterwards (nothing is written
under ~/.cache). The rows' text, joined by newlines within the 64 MiB byte budget, is then used
exactly as ``kind: text`` (bytes or a tokenizer's ids, seeded windows, exact resume).
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import torch

from moec.data.datasets import MAX_TEXT_BYTES, TextBytes
from moec.schema.checks import DATASET_FORMATS


class HfDatasetText(TextBytes):
    def __init__(self, seed: int, seq_len: int, pool_last: bool, data):
        files = {split: _expand(getattr(data, split), split) for split in ("train", "val")}
        text = {split: _column_bytes(paths, data.text_field, split) for split, paths in files.items()}
        super().__init__(seed, seq_len, pool_last, text, data.tokenizer, files)


def _expand(patterns: list[str], split: str) -> list[Path]:
    paths = []
    for pattern in patterns:
        found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found:
            raise ValueError(f"train.data.{split}: {pattern!r} matches no file (resolved against {os.getcwd()})")
        paths += [path for path in found if path not in paths]
    return paths


def _column_bytes(paths: list[Path], field: str, split: str) -> torch.Tensor:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    builder = DATASET_FORMATS[paths[0].suffix.lower()]
    buffer = bytearray()
    with tempfile.TemporaryDirectory(prefix="moec-datasets-") as cache:
        rows = load_dataset(builder, data_files=[str(p) for p in paths], split="train", keep_in_memory=True, cache_dir=cache)
        if field not in rows.column_names:
            raise ValueError(f"train.data.text_field: {field!r} is not a column of {paths[0]} "
                             f"(columns: {', '.join(rows.column_names)})")
        for batch in rows.iter(batch_size=1024):
            for text in batch[field]:
                buffer += (text if isinstance(text, str) else str(text)).encode("utf-8") + b"\n"
            if len(buffer) >= MAX_TEXT_BYTES:
                del buffer[MAX_TEXT_BYTES:]
                break
    return torch.frombuffer(buffer, dtype=torch.uint8).clone() if buffer else torch.zeros(0, dtype=torch.uint8)
