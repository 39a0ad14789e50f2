"""Hugging Face tensor names <-> moec parameter names, and the conversion shard by shard.

HF layer ``i`` is moec block ``i``. Each family gives its names (``Family.layer_names``: the
shared Llama-style table of ``families/base.py`` plus its own) and its expert layout
(``families/experts.py``; GPT-OSS's interleaved one in ``families/gpt_oss.py``). Per-expert
pieces are stacked into moec's [E, out, in] weights once all E have been read, and a gate stack and an
up stack joined into the layer's ``w_gate_up`` [E, 2, I, H] once both are there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import torch

from moec.interop import mtp_layers
from moec.interop.families import Family
from moec.interop.families.base import EXPERTS, GLOBAL
from moec.interop.families.experts import FUSED_HALVES
from moec.interop.weights import WeightsError, index_files
from moec.ir.names import split_block_name

HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class Converter:
    """HF tensors in, moec tensors out; per-expert pieces are held until a layer's stack is complete."""

    def __init__(self, family: Family, moe_layers: list[bool], experts: int, tied: bool = False, mtp_depth: int = 0):
        self.family, self.moe_layers, self.experts, self.tied = family, moe_layers, experts, tied
        self.mtp_depth = mtp_depth  # the checkpoint's multi-token prediction layers, after the model's (moec.interop.mtp_layers)
        self.tables = {has: family.layer_names(has) | family.import_aliases(has) for has in (False, True)}
        self.pending: dict[str, dict[int, torch.Tensor]] = {}  # key -> expert -> piece; fused key -> half -> stack
        self.originals: dict[str, torch.Tensor] = {}  # with MTP layers: the embedding and head their copies must equal
        self.copies: dict[str, tuple[str, torch.Tensor]] = {}  # the MTP layers' copies: hf name -> (moec name, tensor)

    def __call__(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if self.mtp_depth and name in GLOBAL:
            self.originals[GLOBAL[name]] = tensor
        if name == "lm_head.weight" and self.tied:  # some checkpoints store the tied head too: it is embed.weight
            return
        if name in GLOBAL:
            yield GLOBAL[name], tensor
            return
        found = HF_LAYER.match(name)
        if not found:
            raise KeyError(f"tensor {name!r} has no place in the moec model")
        index, rest = int(found.group(1)), found.group(2)
        if index >= len(self.moe_layers):
            yield from self._mtp(name, index - len(self.moe_layers), rest, tensor)
            return
        yield from self._layer(name, f"blocks.{index}.", self.moe_layers[index], rest, tensor)

    def _mtp(self, name: str, depth: int, rest: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """A multi-token prediction layer's tensor: its own, a copy of the model's (checked in ``finish``), or its
        block's (shaped like the model's last layer, as moec's MTP block copies the last block)."""
        if depth >= self.mtp_depth:
            raise KeyError(f"tensor {name!r} has no place in the moec model")
        if rest in mtp_layers.OWN:
            yield f"mtp.{depth}.{mtp_layers.OWN[rest]}", tensor
        elif rest in mtp_layers.COPIES:
            self.copies[name] = (mtp_layers.COPIES[rest], tensor)
        else:
            yield from self._layer(name, f"mtp.{depth}.block.", self.moe_layers[-1], rest, tensor)

    def _layer(self, name: str, prefix: str, moe: bool, rest: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        table = self.tables[moe]
        if rest in table:
            yield prefix + table[rest], tensor
            return
        pieces = self.family.expert_layout.to_moec(rest, tensor) if moe else []
        if not pieces:
            raise KeyError(f"tensor {name!r} has no place in the moec model")
        for ours, expert, piece in pieces:
            if expert is None:
                yield from self._join(prefix + EXPERTS, ours, piece)
            else:
                yield from self._stack(prefix + EXPERTS, ours, expert, piece)

    def _stack(self, prefix: str, ours: str, expert: int, piece: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        pieces = self.pending.setdefault(prefix + ours, {})
        pieces[expert] = piece
        if len(pieces) == self.experts:
            del self.pending[prefix + ours]
            yield from self._join(prefix, ours, torch.stack([pieces[e] for e in range(self.experts)]))

    def _join(self, prefix: str, ours: str, stack: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """A whole stack as it is, or (a gate or up half) into its fused weight once the other half is there."""
        if ours not in FUSED_HALVES:
            yield prefix + ours, stack
            return
        fused, index = FUSED_HALVES[ours]
        halves = self.pending.setdefault(prefix + fused, {})
        halves[index] = stack
        if len(halves) == 2:
            del self.pending[prefix + fused]
            yield prefix + fused, torch.stack([halves[0], halves[1]], dim=1)

    def finish(self) -> None:
        mtp_layers.check_copies(self.copies, self.originals, self.tied)
        if self.pending:
            missing = {key: sorted(set(range(2 if key.endswith("_gate_up") else self.experts)) - set(pieces))
                       for key, pieces in self.pending.items()}
            raise KeyError(f"experts missing from the checkpoint (a fused gate_up's half 0 is the gate, 1 the up): {missing}")


def to_hf(family: Family, moe_layers: list[bool], state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """moec state -> HF tensors (the family's expert layout), one at a time."""
    inverse = {has: {ours: hf for hf, ours in family.layer_names(has).items()} for has in (False, True)}
    glob = {ours: hf for hf, ours in GLOBAL.items()}
    layers, depths = len(moe_layers), set()
    for name, tensor in state.items():
        if name in glob:
            yield glob[name], tensor
            continue
        if (mtp := mtp_layers.MTP_NAME.match(name)) is not None:  # a multi-token prediction layer, after the model's
            depth, rest = int(mtp.group(1)), mtp.group(2)
            depths.add(depth)
            own = mtp_layers.to_hf_names(depth, layers, rest)
            if own is not None:
                yield own, tensor
            elif rest.startswith("block."):
                yield from _layer_to_hf(family, inverse[moe_layers[-1]], f"model.layers.{layers + depth}.",
                                        f"mtp.{depth}.block.", rest.removeprefix("block."), state, name, tensor)
            else:
                raise KeyError(f"parameter {name!r} has no Hugging Face name")
            continue
        found = split_block_name(name)
        if found is None:
            raise KeyError(f"parameter {name!r} has no Hugging Face name")
        index, rest = found
        yield from _layer_to_hf(family, inverse[moe_layers[index]], f"model.layers.{index}.", f"blocks.{index}.", rest, state,
                                name, tensor)
    yield from mtp_layers.copies_to_hf(depths, layers, state)


def _layer_to_hf(family: Family, inverse: dict, prefix: str, owner: str, rest: str, state: dict, name: str, tensor):
    """One decoder layer's moec tensor (``owner`` + ``rest``) under HF's ``prefix``."""
    if rest.startswith(EXPERTS) and family.expert_layout is not None:
        experts = owner + EXPERTS
        yield from family.expert_layout.to_hf(prefix, rest.removeprefix(EXPERTS), lambda ours: state[experts + ours])
    elif rest in inverse:
        yield prefix + inverse[rest], tensor
    else:
        raise KeyError(f"parameter {name!r} has no Hugging Face name")


def hf_shapes(family: Family, moe_layers: list[bool], model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> the shape a moec model (built from the config, say on the meta device) needs, in the family's layout."""
    return {name: tuple(tensor.shape) for name, tensor in to_hf(family, moe_layers, model.state_dict())}


PICKLED = ("pytorch_model*.bin", "*.pt", "*.pth")  # torch.save files: unpickling them can run any code


def source_files(directory: Path) -> list[Path]:
    """The safetensors files of an HF directory (sharded via model.safetensors.index.json or one file).

    Pickled weights without safetensors beside them are refused, never loaded.
    """
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return [directory / f for f in index_files(index)]
    files = sorted(directory.glob("*.safetensors"))
    pickled = sorted({p.name for pattern in PICKLED for p in directory.glob(pattern)})
    if pickled and not files:
        raise WeightsError(f"{directory / pickled[0]}: pickled weights are not read (unpickling can run code); convert them to "
                           "safetensors first, e.g. with transformers: AutoModelForCausalLM.from_pretrained(DIR)"
                           ".save_pretrained(OUT, safe_serialization=True)")
    return files
