"""Training data that needs no download, deterministic in (seed, split, step).

Every batch is a pure function of the run seed, the split and the batch index, so the data
position saved in a checkpoint is just that index: a resumed run sees exactly the batches
the uninterrupted run would have seen.

- ``text``: bytes of local files (globs; ``stdlib:`` is the Python standard library's
  directory), split into train / validation by file (a hash of the file's path), random
  windows of ``seq_len + 1`` bytes.
- ``signals``: 1-D sines, sums of harmonics and spirals projected to 1-D.
- ``trajectories``: 3-D helix, elliptical orbit, Lissajous curve and Lorenz attractor.
- ``hf_dataset``: a text column of local Hugging Face dataset files (``moec.data.hf_dataset``).
- ``token_files``: pre-tokenized ids, read a window at a time (``moec.data.token_files``).
- ``random_tokens``: uniform bytes (for benchmarks: nothing to learn).

A batch is ``(inputs, targets)``: inputs ``[B, S]`` token ids or ``[B, S, dims]`` values,
targets the next token / value at every position ``[B, S(, dims)]``, or only after the
window ``[B, 1(, dims)]`` when the model pools the last position.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import math
import os
import stat
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_TEXT_BYTES = 64 << 20  # read at most this much text: plenty for a CPU-sized model
MAX_GLOB_ENTRIES = 200_000  # directory entries one pattern may visit (the stdlib is ~15,000)
MAX_GLOB_SECONDS = 20.0
MAX_GLOB_FILES = 100_000
SPLITS = {"train": 0, "val": 1}


def batch_generator(seed: int, split: str, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"moec-data:{seed}:{split}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor


class Dataset:
    """Base: ``batch(split, index, size)``; subclasses draw a batch from a seeded generator."""

    bytes_per_token: float | None = 1.0  # bytes of text behind one token (bits per byte); None: not known

    def __init__(self, seed: int, seq_len: int, pool_last: bool):
        self.seed, self.seq_len, self.pool_last = seed, seq_len, pool_last

    def batch(self, split: str, index: int, size: int) -> Batch:
        window = self.windows(batch_generator(self.seed, split, index), split, size)  # [B, S+1, ...]
        inputs = window[:, :-1]
        targets = window[:, -1:] if self.pool_last else window[:, 1:]
        return Batch(inputs, targets)

    def windows(self, generator: torch.Generator, split: str, size: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """What the batches are drawn from; a resumed run must see the same (synthetic data: the spec says it all)."""
        return hashlib.sha256(f"{type(self).__name__}:{self.seed}:{self.seq_len}".encode()).hexdigest()


def expand_globs(patterns: list[str]) -> list[Path]:
    """Files matching the patterns (``**`` recursive, hidden names skipped as glob does), bounded in work."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files: set[Path] = set()
    for pattern in patterns:
        expanded = pattern.replace("stdlib:", stdlib.rstrip("/") + "/", 1) if pattern.startswith("stdlib:") else pattern
        files |= set(_bounded_glob(expanded, pattern))
        if len(files) > MAX_GLOB_FILES:
            raise ValueError(f"train.data.files: the patterns match more than {MAX_GLOB_FILES} files; narrow them")
    return sorted(files, key=lambda path: str(path).split(os.sep))  # Path order (by parts), cheaper


def _bounded_glob(pattern: str, shown: str) -> list[Path]:
    if not glob.has_magic(pattern):
        return [Path(pattern)] if Path(pattern).is_file() else []
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root, rest = Path(*parts[:fixed]) if fixed else Path("."), parts[fixed:]
    visited, started, found = 0, time.monotonic(), []
    states_of = {str(root): _advance_states(rest, {0}, None)}  # where in the pattern each directory stands
    for directory, dirs, names in os.walk(root):
        states = states_of.pop(directory)
        visited += len(dirs) + len(names)
        if visited > MAX_GLOB_ENTRIES or time.monotonic() - started > MAX_GLOB_SECONDS:
            what = f"more than {MAX_GLOB_ENTRIES} directory entries" if visited > MAX_GLOB_ENTRIES else f"more than {MAX_GLOB_SECONDS:.0f} s"
            raise ValueError(f"train.data.files: pattern {shown!r} takes {what} to expand; narrow it")
        kept = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            below = _advance_states(rest, states, name)
            if below - {len(rest)}:  # some of the pattern is left to match deeper down
                states_of[os.path.join(directory, name)] = below
                kept.append(name)
        dirs[:] = kept
        found += [os.path.join(directory, name) for name in _completing(rest, states, names)]
    return [Path(path) for path in found if os.path.isfile(path)]


def _completing(pattern: tuple, states: set, names: list[str]) -> list[str]:
    """The names that complete the pattern from ``states`` (what ``_advance_states`` would accept, per name)."""
    last = len(pattern) - 1
    if any(i == last and pattern[i] == "**" for i in states):
        return names
    finals = [pattern[i] for i in states if i == last]
    return [name for name in names if any(_component_matches(final, name) for final in finals)]


def _component_matches(component: str, name: str) -> bool:
    """One glob component against one name; hidden names match only components that start with a dot."""
    return not (name.startswith(".") and not component.startswith(".")) and fnmatch.fnmatchcase(name, component)


def _advance_states(pattern: tuple, states: set, name: str | None) -> set:
    """The pattern positions reached from ``states`` by one more path component ``name`` (None: none yet).

    A set of positions, as a glob NFA: component ``i`` matches ``name`` -> position ``i + 1``;
    ``**`` stands for any number of directories (zero or more, one or more when last). Hidden names
    match only components that start with a dot. Matching walks each directory once, not each
    file's every split of its path.
    """
    reached = set(states)
    if name is not None:
        reached = set()
        for i in states:
            if i == len(pattern):
                continue
            head = pattern[i]
            if head == "**":
                reached |= {i, i + 1} if i + 1 == len(pattern) else {i}
            elif _component_matches(head, name):
                reached.add(i + 1)
    for i in sorted(reached):  # ``**`` may match no directory at all (not when it is last: one or more)
        while i + 1 < len(pattern) and pattern[i] == "**":
            reached.add(i + 1)
            i += 1
    return reached


def is_validation_file(path: Path, root: str, fraction: float) -> bool:
    """A stable split by file: the first 8 bytes of sha256(relative path) against the fraction."""
    name = str(path.relative_to(root)) if str(path).startswith(root) else str(path)
    value = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") / 2**64
    return value < fraction


def split_files(files: list[str], val_fraction: float) -> dict[str, list[Path]]:
    """The files of ``train.data.files``, split into train / validation by :func:`is_validation_file`."""
    paths = expand_globs(files)
    if not paths:
        raise ValueError(f"train.data.files: no files match {files}")
    root = sysconfig.get_paths()["stdlib"]
    parts: dict[str, list[Path]] = {"train": [], "val": []}
    for path in paths:
        parts["val" if is_validation_file(path, root, val_fraction) else "train"].append(path)
    if not parts["val"] or not parts["train"]:
        parts["val"], parts["train"] = paths[:1], paths[1:] or paths[:1]  # too few files to split by hash
    return parts


class TextBytes(Dataset):
    """Windows of text: each split's bytes as they are, or as a tokenizer's ids."""

    def __init__(self, seed: int, seq_len: int, pool_last: bool, text: dict[str, torch.Tensor], tokenizer: str = "bytes",
                 files: dict[str, list[Path]] | None = None):
        """``text``: each split's bytes (``read_text``); ``files``: the paths they came from, per split."""
        super().__init__(seed, seq_len, pool_last)
        self.files = files or {}
        self.data, unit = text, "bytes"
        if tokenizer != "bytes":  # ids of a Hugging Face tokenizer; bits per byte still counts the text's bytes
            text_bytes = self.data["val"].numel()
            self.data = tokenize(self.data, tokenizer)
            self.bytes_per_token, unit = text_bytes / max(self.data["val"].numel(), 1), "tokens"
        digest = hashlib.sha256()
        for split in ("train", "val"):
            digest.update(f"{split}:{self.data[split].numel()}:".encode())
            digest.update(self.data[split].numpy().tobytes())
        self._fingerprint = digest.hexdigest()
        for split, data in self.data.items():
            if data.numel() <= seq_len + 1:
                raise ValueError(f"{split} text has {data.numel()} {unit}; need more than seq_len + 1 = {seq_len + 1}")

    @classmethod
    def from_files(cls, seed: int, seq_len: int, pool_last: bool, files: list[str], val_fraction: float,
                   tokenizer: str = "bytes") -> "TextBytes":
        """``kind: text``: local files (globs), split into train / validation by file."""
        parts = split_files(files, val_fraction)
        return cls(seed, seq_len, pool_last, {split: read_text(paths) for split, paths in parts.items()}, tokenizer, parts)

    @property
    def fingerprint(self) -> str:
        """sha256 of the bytes the batches come from (both splits, after the byte budget)."""
        return self._fingerprint

    def windows(self, generator, split, size):
        data = self.data[split]
        starts = torch.randint(0, data.numel() - self.seq_len - 1, (size,), generator=generator)
        offsets = torch.arange(self.seq_len + 1)
        return data[starts[:, None] + offsets[None, :]].long()


def tokenize(splits: dict[str, torch.Tensor], tokenizer_file: str) -> dict[str, torch.Tensor]:
    """Each split's bytes (UTF-8, invalid bytes replaced) as int32 ids of a tokenizer.json, encoded in
    line-aligned chunks of about 1 MiB (encode_batch runs them on every core)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_file)
    out = {}
    for split, data in splits.items():
        text = bytes(data.numpy()).decode("utf-8", errors="replace")
        chunks, start = [], 0
        while start < len(text):
            end = text.find("\n", start + (1 << 20))
            end = len(text) if end < 0 else end + 1
            chunks.append(text[start:end])
            start = end
        encoded = tokenizer.encode_batch(chunks, add_special_tokens=False)
        out[split] = torch.tensor([i for e in encoded for i in e.ids], dtype=torch.int32)
    return out


def read_text(paths: list[Path]) -> torch.Tensor:
    """The files' bytes, each followed by a newline, up to MAX_TEXT_BYTES in all, streamed: a huge
    file is read only as far as the budget."""
    buffer, total = bytearray(), 0
    for path in paths:
        buffer += _read_text_file(path, MAX_TEXT_BYTES - total) + b"\n"
        total = len(buffer)
        if total >= MAX_TEXT_BYTES:
            break
    return torch.frombuffer(buffer, dtype=torch.uint8).clone() if buffer else torch.zeros(0, dtype=torch.uint8)


def _read_text_file(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file; unreadable or special files are one clean error."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    except OSError as err:
        raise ValueError(f"train.data.files: cannot read {path}: {err.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"train.data.files: {path} is not a regular file")
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as err:
        raise ValueError(f"train.data.files: cannot read {path}: {err.strerror}") from None
    finally:
        os.close(fd)


class RandomTokens(Dataset):
    def __init__(self, seed, seq_len, pool_last, vocab: int):
        super().__init__(seed, seq_len, pool_last)
        self.vocab = vocab

    def windows(self, generator, split, size):
        return torch.randint(0, self.vocab, (size, self.seq_len + 1), generator=generator)


def _uniform(generator, size, low, high):
    return low + (high - low) * torch.rand(size, generator=generator, dtype=torch.float64)


class _Synthetic(Dataset):
    """Curves drawn per sample: pick a pattern, draw its parameters, add noise."""

    def __init__(self, seed, seq_len, pool_last, patterns: list[str], noise: float):
        super().__init__(seed, seq_len, pool_last)
        self.patterns, self.noise = patterns, noise

    def windows(self, generator, split, size):
        t = torch.arange(self.seq_len + 1, dtype=torch.float64)[None, :]
        kind = torch.randint(0, len(self.patterns), (size,), generator=generator)
        curves = self.curves(generator, t, size)  # name -> [B, S+1, channels]
        stacked = torch.stack([curves[name].expand(size, -1, -1) for name in self.patterns], 0)
        picked = stacked[kind, torch.arange(size)]
        picked = picked + self.noise * torch.randn(picked.shape, generator=generator, dtype=torch.float64)
        return picked.float()

    def curves(self, generator, t: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Signals(_Synthetic):
    """1-D: sine, three harmonics, and a spiral (growing radius) seen along one axis."""

    def curves(self, generator, t, size):
        omega = _uniform(generator, (size, 1), 0.15, 0.6)  # radians per step: the last value is a poor guess
        phase = _uniform(generator, (size, 1), 0, 2 * math.pi)
        amplitude = _uniform(generator, (size, 1), 0.5, 1.5)
        curves = {
            "sine": amplitude * torch.sin(omega * t + phase),
            "harmonics": amplitude * (torch.sin(omega * t + phase) + 0.5 * torch.sin(2 * omega * t + 2 * phase)
                                      + 0.25 * torch.sin(3 * omega * t + 3 * phase)) / 1.75,
            "spiral": amplitude * (0.3 + 0.7 * t / t.shape[1]) * torch.cos(omega * t + phase),
        }
        return {name: curve.unsqueeze(-1) for name, curve in curves.items()}


class Trajectories(_Synthetic):
    """3-D: helix, elliptical orbit, Lissajous curve, Lorenz attractor (normalised)."""

    def curves(self, generator, t, size):
        omega = _uniform(generator, (size, 1), 0.1, 0.4)
        phase = _uniform(generator, (size, 1), 0, 2 * math.pi)
        rise = ((t - t.mean()) / t.shape[1] * 2).expand(size, -1)
        return {
            "helix": torch.stack([torch.cos(omega * t + phase), torch.sin(omega * t + phase), rise], -1),
            "orbit": torch.stack([1.2 * torch.cos(omega * t + phase), 0.6 * torch.sin(omega * t + phase), 0.3 * torch.sin(omega * t + phase)], -1),
            "lissajous": torch.stack([torch.sin(omega * t + phase), torch.sin(2 * omega * t), torch.sin(3 * omega * t + phase / 2)], -1),
            "lorenz": self._lorenz(generator, size),
        }

    def _lorenz(self, generator, size, dt: float = 0.01, substeps: int = 4) -> torch.Tensor:
        state = torch.randn(size, 3, generator=generator, dtype=torch.float64) * 5 + torch.tensor([0.0, 0.0, 25.0], dtype=torch.float64)
        points = []
        for _ in range(self.seq_len + 1):
            for _ in range(substeps):  # Euler steps of the classic sigma=10, rho=28, beta=8/3 system
                x, y, z = state.unbind(-1)
                state = state + dt * torch.stack([10 * (y - x), x * (28 - z) - y, x * y - 8 / 3 * z], -1)
            points.append(state)
        path = torch.stack(points, 1)
        return (path - torch.tensor([0.0, 0.0, 25.0], dtype=torch.float64)) / 10.0


def last_value_baseline(dataset: Dataset, batches: int, size: int) -> float:
    """MSE of predicting each next value by the current one, on the validation batches."""
    total = 0.0
    for index in range(batches):
        batch = dataset.batch("val", index, size)
        guess = batch.inputs[:, -1:] if dataset.pool_last else batch.inputs
        total += torch.mean((batch.targets - guess) ** 2).item()
    return total / batches
