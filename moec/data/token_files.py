"""``kind: token_files``: pre-tokenized ids in flat binary files, read a window at a time, never whole.

The format nanoGPT's ``prepare.py`` writes: a file is a flat array of little-endian ``uint16`` (or
``uint32``) token ids, documents joined by the tokenizer's end-of-text id. Each split is one or
more files; a window of ``seq_len + 1`` ids is drawn uniformly over every position of every file
where it fits (``searchsorted`` over the files' window counts), from the batch's seeded
generator, so a batch stays a pure function of (seed, split, index) and a resume is exact.
Each window is one ``pread`` of ``(seq_len + 1) x width`` bytes, so the process holds only the
batch: resident memory does not grow with the files' size. (A memory map would serve the same
bytes, but the kernel's fault-around maps 64 KiB of neighbouring cached pages per window into
the process, and its RSS then climbs towards the file's size: measured 71 MiB for a 64 MiB file
after 200 batches; ``pread`` measured under 2 MiB, see benchmarks/token_files_data.py.)

The fingerprint that guards a resume is the files' names, sizes and the sha256 of their first
and last MiB (hashing every byte of a 100 GB corpus at each start would take minutes).
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from moec.data.datasets import Dataset

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
EDGE_BYTES = 1 << 20  # the fingerprint hashes this much at each end of a file


class TokenFiles(Dataset):
    bytes_per_token = None  # the text behind the ids is not at hand: validation reports bits per token
    def __init__(self, seed: int, seq_len: int, pool_last: bool, train: list[str], val: list[str], dtype: str, vocab: int):
        super().__init__(seed, seq_len, pool_last)
        self.vocab, self.dtype = vocab, DTYPES[dtype]
        self.files = {"train": _expand(train, "train"), "val": _expand(val, "val")}
        self.arrays = {split: [self._map(path, split) for path in paths] for split, paths in self.files.items()}
        # windows_before[i]: windows in the split's files before file i; the last entry is the total
        self.windows_before = {split: np.cumsum([0] + [max(len(a) - seq_len, 0) for a in arrays])
                               for split, arrays in self.arrays.items()}
        for split, counts in self.windows_before.items():
            if counts[-1] == 0:
                raise ValueError(f"train.data.{split}: no file holds more than seq_len + 1 = {seq_len + 1} tokens")
        self._fingerprint = _fingerprint(self.files)

    def _map(self, path: Path, split: str) -> "_TokenFile":
        size = path.stat().st_size
        width = np.dtype(self.dtype).itemsize
        if size % width:
            raise ValueError(f"train.data.{split}: {path} has {size} bytes, not a whole number of {width}-byte token ids "
                             f"(is train.data.dtype right?)")
        return _TokenFile(path, size // width, np.dtype(self.dtype).newbyteorder("<"))

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def windows(self, generator, split, size):
        counts, arrays = self.windows_before[split], self.arrays[split]
        positions = torch.randint(0, int(counts[-1]), (size,), generator=generator).numpy()
        which = np.searchsorted(counts, positions, side="right") - 1  # the file each window lies in
        rows = [arrays[f].read(p - counts[f], self.seq_len + 1) for f, p in zip(which, positions)]
        window = torch.from_numpy(np.stack(rows).astype(np.int64))
        if window.numel() and int(window.max()) >= self.vocab:
            bad = int(np.argmax([int(row.max()) >= self.vocab for row in rows]))
            raise ValueError(f"train.data.{split}: {self.files[split][which[bad]]} holds token id {int(rows[bad].max())}, "
                             f"but model.inputs.vocab is {self.vocab} (was it tokenized for another vocabulary?)")
        return window


class _TokenFile:
    """One file of ids, read a window at a time with ``pread``: nothing of it is mapped or kept."""

    def __init__(self, path: Path, length: int, dtype: np.dtype):
        self.path, self.length, self.dtype = path, length, dtype

    def __len__(self) -> int:
        return self.length

    def read(self, start: int, count: int) -> np.ndarray:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, count * self.dtype.itemsize, start * self.dtype.itemsize)
        finally:
            os.close(fd)
        if len(data) != count * self.dtype.itemsize:
            raise ValueError(f"{self.path} became shorter while training (read {len(data)} bytes at token {start})")
        return np.frombuffer(data, dtype=self.dtype)


def _expand(patterns: list[str], split: str) -> list[Path]:
    paths = []
    for pattern in patterns:
        found = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
        if not found:
            raise ValueError(f"train.data.{split}: {pattern!r} matches no file (resolved against {os.getcwd()})")
        paths += [Path(path) for path in found if Path(path) not in paths]
    return paths


def _fingerprint(files: dict[str, list[Path]]) -> str:
    digest = hashlib.sha256()
    for split, paths in files.items():
        for path in paths:
            size = path.stat().st_size
            digest.update(f"{split}:{path.name}:{size}:".encode())
            with open(path, "rb") as handle:
                digest.update(handle.read(EDGE_BYTES))
                handle.seek(max(size - EDGE_BYTES, 0))
                digest.update(handle.read(EDGE_BYTES))
    return digest.hexdigest()
