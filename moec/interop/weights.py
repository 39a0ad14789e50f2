"""moec weights files: safetensors, written shard by shard, loaded into a built model.

``<stem>.safetensors`` when the weights fit one shard, else ``<stem>-00001-of-0000N.safetensors``
and ``<stem>.safetensors.index.json`` (``{"weight_map": {name: file}}``, the HF convention).
Nothing is pickled.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

SHARD_BYTES = 1 << 30


class WeightsError(ValueError):
    """Weights that cannot be read as they claim (damaged, pickled, the wrong shape); the message names the file."""


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """``safe_open`` whose refusals (a damaged header, a truncated file) are one ``WeightsError`` line naming the file."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        handle = safe_open(str(path), "pt")
    except (SafetensorError, OSError) as err:
        reason = str(err).removeprefix("Error while deserializing header: ")
        raise WeightsError(f"{path}: not a readable safetensors file, damaged or not safetensors ({reason})") from None
    with handle as f:
        yield f


class ShardWriter:
    """Collects tensors and writes a shard whenever ``shard_bytes`` are held: memory stays one shard."""

    def __init__(self, stem: Path, shard_bytes: int = SHARD_BYTES, metadata: dict | None = None):
        self.stem, self.shard_bytes, self.metadata = stem, shard_bytes, metadata or {}
        self.buffer: dict[str, torch.Tensor] = {}
        self.held = 0
        self.parts: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.buffer or any(name in names for _, names in self.parts):
            raise KeyError(f"tensor {name!r} written twice")
        self.buffer[name] = tensor.contiguous()
        self.held += tensor.numel() * tensor.element_size()
        if self.held >= self.shard_bytes:
            self._flush()

    def abort(self) -> None:
        """Remove every shard written so far: a refused conversion leaves nothing behind."""
        for path, _ in self.parts:
            path.unlink(missing_ok=True)
        self.buffer, self.held, self.parts = {}, 0, []

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        path = self.stem.with_name(f"{self.stem.name}.part{len(self.parts):05d}.safetensors")
        save_file(self.buffer, str(path), metadata={"format": "pt", **self.metadata})
        self.parts.append((path, list(self.buffer)))
        self.buffer, self.held = {}, 0

    def close(self) -> Path:
        """Final names; returns the file to load (the single shard, or the index)."""
        self._flush()
        single = self.stem.with_name(self.stem.name + ".safetensors")
        if len(self.parts) <= 1:
            if self.parts:
                self.parts[0][0].replace(single)
            return single
        count, weight_map = len(self.parts), {}
        for n, (path, names) in enumerate(self.parts, 1):
            final = self.stem.with_name(f"{self.stem.name}-{n:05d}-of-{count:05d}.safetensors")
            path.replace(final)
            weight_map.update({name: final.name for name in names})
        index = self.stem.with_name(self.stem.name + ".safetensors.index.json")
        index.write_text(json.dumps({"metadata": self.metadata, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
        return index


def weight_files(path: Path) -> list[Path]:
    path = Path(path)
    if path.name.endswith(".index.json"):
        return [path.with_name(f) for f in index_files(path)]
    return [path]


def index_files(index: Path) -> list[str]:
    """The file names a ``*.safetensors.index.json`` maps tensors to; a damaged index is a ``WeightsError``."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise WeightsError(f"{index}: not a safetensors index (no weight_map of file names: {type(err).__name__})") from None


def tensor_shapes(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """name -> (file, shape) from the headers alone: every file is opened (a damaged one refused), no tensor is read."""
    found = {}
    for file in files:
        with open_safetensors(file) as f:
            found |= {name: (file, tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    return found


def read_all(files: list[Path]) -> dict[str, torch.Tensor]:
    state = {}
    for file in files:
        with open_safetensors(file) as f:
            state |= {name: f.get_tensor(name) for name in f.keys()}
    return state


@torch.no_grad()
def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy a weights file (or index) into ``model``; every parameter and buffer must be there, nothing else."""
    state = model.state_dict()
    seen: set[str] = set()
    for file in weight_files(path):
        with open_safetensors(file) as f:
            for name in f.keys():
                if name not in state:
                    raise WeightsError(f"{file}: tensor {name!r} is not a parameter of the model")
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(state[name].shape):
                    raise WeightsError(f"{file}: {name} has shape {tuple(tensor.shape)}, "
                                       f"the model wants {tuple(state[name].shape)}")
                state[name].copy_(tensor.to(state[name].dtype))
                seen.add(name)
    missing = sorted(set(state) - seen)
    if missing:
        raise WeightsError(f"{path}: no weights for {len(missing)} parameter(s): "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def save_weights(state: dict[str, torch.Tensor], stem: Path, shard_bytes: int = SHARD_BYTES) -> Path:
    writer = ShardWriter(Path(stem), shard_bytes)
    for name, tensor in state.items():
        writer.add(name, tensor.detach().cpu())
    return writer.close()
