"""The per-expert layout most families store experts in, read and written.

``save_pretrained`` writes one tensor per expert and projection, ``<module>.experts.<e>.<proj>.weight``,
stacked into [E, out, in] once all E pieces have been read; gate and up then go into moec's one
``moe.experts.w_gate_up`` [E, 2, I, H] (gate first, ``FUSED_HALVES``: the converter joins them), down
into ``w_down``. transformers v5 holds them fused in memory, ``mlp.experts.gate_up_proj`` [E, 2I, H]
(the first I rows are the gate: moec's layout, taken as a view) and ``mlp.experts.down_proj`` [E, H, I]:
read too. Export writes the per-expert layout, which every transformers version loads.

A layout turns one HF tensor into ``(moec expert name, expert index or None, tensor)`` pieces
(an index: one expert's slice, stacked by the converter) and moec's stacks back into HF tensors.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

Piece = tuple[str, int | None, torch.Tensor]
ExpertLookup = Callable[[str], torch.Tensor]  # moec expert name (w_gate_up, b_down, ...) -> this layer's stack
# Halves of moec's fused gate + up: a stack under the key's name is index i of dim 1 of the fused weight (gate 0, up 1).
FUSED_HALVES = {"w_gate": ("w_gate_up", 0), "w_up": ("w_gate_up", 1), "b_gate": ("b_gate_up", 0), "b_up": ("b_gate_up", 1)}


class PerExpertLayout:
    def __init__(self, modules: tuple[str, ...], projections: dict[str, str]):
        """``modules``: the HF modules holding the experts (export writes the first); ``projections``: HF -> moec name."""
        self.module, self.projections = modules[0], projections
        self.hf_names = {ours: hf for hf, ours in projections.items()}
        module, proj = "|".join(modules), "|".join(projections)
        self.per_expert = re.compile(rf"^(?:{module})\.experts\.(\d+)\.({proj})\.weight$")
        self.fused = re.compile(rf"^(?:{module})\.experts\.(gate_up_proj|down_proj)$")

    def to_moec(self, rest: str, tensor: torch.Tensor) -> list[Piece]:
        """The moec pieces of an HF layer tensor; empty when it is not an expert tensor of this layout."""
        if m := self.per_expert.match(rest):
            return [(self.projections[m.group(2)], int(m.group(1)), tensor)]
        if m := self.fused.match(rest):
            if m.group(1) == "down_proj":
                return [("w_down", None, tensor)]
            return [("w_gate_up", None, tensor.unflatten(1, (2, -1)))]  # [E, 2I, H], gate rows first: a view
        return []

    def to_hf(self, prefix: str, name: str, experts: ExpertLookup) -> Iterator[tuple[str, torch.Tensor]]:
        """The HF tensors of moec's expert stack ``name`` (``prefix``: ``model.layers.<i>.``); ``w_gate_up`` gives each
        expert's gate and up projections."""
        stack = experts(name)
        halves = [(half, index) for half, (fused, index) in FUSED_HALVES.items() if fused == name]
        for e in range(stack.shape[0]):
            if not halves:
                yield f"{prefix}{self.module}.experts.{e}.{self.hf_names[name]}.weight", stack[e]
            for half, index in halves:
                yield f"{prefix}{self.module}.experts.{e}.{self.hf_names[half]}.weight", stack[e, index]


GATE_UP_DOWN = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}
MLP_EXPERTS = PerExpertLayout(("mlp",), GATE_UP_DOWN)  # Qwen2-MoE, Qwen3-MoE, OLMoE
