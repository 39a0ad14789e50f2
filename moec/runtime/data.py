"""Training data that needs no download, deterministic in (seed, split, step).

Every batch is a pure function of the run seed, the split and the batch index, so the data
position saved in a checkpoint is just that index: a resumed run sees exactly the batches
the uninterrupted run would have seen.

- ``text``: bytes of local files (globs; ``stdlib:`` is the Python standard library's
  directory), split into train / validation by file (a hash of the file's path), random
  windows of ``seq_len + 1`` bytes.
- ``signals``: 1-D sines, sums of harmonics and spirals projected to 1-D.
- ``trajectories``: 3-D helix, elliptical orbit, Lissajous curve and Lorenz attractor.
- ``random_tokens``: uniform bytes (for benchmarks: nothing to learn).

A batch is ``(inputs, targets)``: inputs ``[B, S]`` token ids or ``[B, S, dims]`` values,
targets the next token / value at every position ``[B, S(, dims)]``, or only after the
window ``[B, 1(, dims)]`` when the model pools the last position.
"""

from __future__ import annotations

import glob
import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_TEXT_BYTES = 64 << 20  # read at most this much text: plenty for a CPU-sized model
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

    def __init__(self, seed: int, seq_len: int, pool_last: bool):
        self.seed, self.seq_len, self.pool_last = seed, seq_len, pool_last

    def batch(self, split: str, index: int, size: int) -> Batch:
        window = self.windows(batch_generator(self.seed, split, index), split, size)  # [B, S+1, ...]
        inputs = window[:, :-1]
        targets = window[:, -1:] if self.pool_last else window[:, 1:]
        return Batch(inputs, targets)

    def windows(self, generator: torch.Generator, split: str, size: int) -> torch.Tensor:
        raise NotImplementedError


def expand_globs(patterns: list[str]) -> list[Path]:
    stdlib = sysconfig.get_paths()["stdlib"]
    files: set[Path] = set()
    for pattern in patterns:
        pattern = pattern.replace("stdlib:", stdlib.rstrip("/") + "/", 1) if pattern.startswith("stdlib:") else pattern
        files |= {Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()}
    return sorted(files)


def is_validation_file(path: Path, root: str, fraction: float) -> bool:
    """A stable split by file: the first 8 bytes of sha256(relative path) against the fraction."""
    name = str(path.relative_to(root)) if str(path).startswith(root) else str(path)
    value = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") / 2**64
    return value < fraction


class TextBytes(Dataset):
    def __init__(self, seed: int, seq_len: int, pool_last: bool, files: list[str], val_fraction: float):
        super().__init__(seed, seq_len, pool_last)
        paths = expand_globs(files)
        if not paths:
            raise ValueError(f"no files match {files}")
        root = sysconfig.get_paths()["stdlib"]
        parts = {"train": [], "val": []}
        for path in paths:
            parts["val" if is_validation_file(path, root, val_fraction) else "train"].append(path)
        if not parts["val"] or not parts["train"]:
            parts["val"], parts["train"] = paths[:1], paths[1:] or paths[:1]  # too few files to split by hash
        self.files = parts
        self.data = {split: self._read(split_paths) for split, split_paths in parts.items()}
        for split, data in self.data.items():
            if data.numel() <= seq_len + 1:
                raise ValueError(f"{split} text has {data.numel()} bytes; need more than seq_len + 1 = {seq_len + 1}")

    @staticmethod
    def _read(paths: list[Path]) -> torch.Tensor:
        chunks, total = [], 0
        for path in paths:
            raw = path.read_bytes()[: MAX_TEXT_BYTES - total]
            chunks.append(raw + b"\n")
            total += len(raw) + 1
            if total >= MAX_TEXT_BYTES:
                break
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).clone()

    def windows(self, generator, split, size):
        data = self.data[split]
        starts = torch.randint(0, data.numel() - self.seq_len - 1, (size,), generator=generator)
        offsets = torch.arange(self.seq_len + 1)
        return data[starts[:, None] + offsets[None, :]].long()


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


def make_dataset(spec) -> Dataset:
    data, train, model = spec.train.data, spec.train, spec.model
    pool_last = model.head.pool == "last"
    if data.kind == "text":
        return TextBytes(train.seed, train.seq_len, pool_last, list(data.files), data.val_fraction)
    if data.kind == "random_tokens":
        return RandomTokens(train.seed, train.seq_len, pool_last, model.inputs.vocab)
    if data.kind == "signals":
        return Signals(train.seed, train.seq_len, pool_last, list(data.patterns), data.noise)
    return Trajectories(train.seed, train.seq_len, pool_last, list(data.patterns), data.noise)


def last_value_baseline(dataset: Dataset, batches: int, size: int) -> float:
    """MSE of predicting each next value by the current one, on the validation batches."""
    total = 0.0
    for index in range(batches):
        batch = dataset.batch("val", index, size)
        guess = batch.inputs[:, -1:] if dataset.pool_last else batch.inputs
        total += torch.mean((batch.targets - guess) ** 2).item()
    return total / batches
