"""Named ranges for the phases of an MoE layer in torch.profiler traces.

The generated MoE forward wraps its router, permutation, expert GEMMs and combine in
``with phase("moe.router"):`` blocks (the expert-parallel exchange wraps its all-to-alls in
``moe.all_to_all``); ``moec train --profile`` sums them per step (``moec.observe.profile``).
Under torch.compile a phase is no range: Inductor's kernels fuse across the phases, and a
range there would be dropped with a warning anyway.
"""

from __future__ import annotations

import contextlib

import torch

# In the order a forward runs them; the names the profile summary looks for.
MOE_PHASES = ("moe.router", "moe.permute", "moe.experts", "moe.all_to_all", "moe.combine")


def phase(name: str):
    """A ``torch.profiler.record_function`` range named ``name``; nothing while torch.compile traces."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.profiler.record_function(name)
