"""Annealed MoE settings: a router temperature, noise std or capacity factor that moves from
``start`` to ``end`` over the first ``steps`` training steps, then stays at ``end`` (the `m`
library's "capacity factor 2.0 during warmup then 1.25", "temperature 1.5 down to 1.0, noise
decaying to 0").

An MoE layer with any annealed setting gets a non-trainable buffer ``router.anneal`` of three
values, (temperature, noise std, capacity factor) at the current step; the ops that use an
annealed setting read it from there (docs/semantics.md), the trainer writes it before each
step (:func:`anneal_values`), and it starts at the step-0 values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ANNEAL = "router.anneal"  # the buffer's slot: [temperature, noise std, capacity factor]


@dataclass(frozen=True)
class Schedule:
    start: float
    end: float
    steps: int
    kind: str = "linear"  # linear | cosine

    def at(self, step: int) -> float:
        """The value before training step ``step`` (0-based): start at 0, end from ``steps`` on."""
        t = min(step / self.steps, 1.0)
        shape = t if self.kind == "linear" else (1.0 - math.cos(math.pi * t)) / 2.0
        return self.start + (self.end - self.start) * shape

    @property
    def peak(self) -> float:
        return max(self.start, self.end)


@dataclass(frozen=True)
class AnnealAttrs:
    """Which of an MoE layer's settings are annealed (None: constant, as in RouterAttrs / CapacityAttrs)."""

    temperature: Schedule | None = None
    noise_std: Schedule | None = None
    capacity_factor: Schedule | None = None


def schedule_of(value) -> Schedule | None:
    """A spec value (a number or an ``Anneal`` section) as a Schedule, or None for a constant."""
    if value is None or isinstance(value, (int, float)):
        return None
    return Schedule(start=value.start, end=value.end, steps=value.steps, kind=value.kind)


def anneal_values(anneal: AnnealAttrs, constants: tuple[float, float, float], step: int) -> list[float]:
    """The buffer's values before ``step``; ``constants`` fill the settings that are not annealed."""
    return [schedule.at(step) if schedule is not None else constant
            for schedule, constant in zip((anneal.temperature, anneal.noise_std, anneal.capacity_factor), constants)]


def constant(value, default: float = 0.0) -> float:
    """A spec value as the constant the layer's attrs hold: a number, or an annealed value's peak (sizes are static)."""
    if value is None:
        return default
    schedule = schedule_of(value)
    return float(value) if schedule is None else schedule.peak
