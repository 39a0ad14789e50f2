"""Initial weights from the spec seed: the same values in every backend, process and machine."""

from __future__ import annotations

import hashlib

import torch

from moec.ir.graph import Node


def parameter_seed(seed: int, name: str) -> int:
    """A per-parameter seed: the same weights whatever the build order, machine or backend."""
    digest = hashlib.sha256(f"moec:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_parameter(node: Node, seed: int, device="cpu") -> torch.Tensor:
    shape, init = tuple(node.attr["shape"]), node.attr["init"]
    if init == "ones":
        return torch.ones(shape, device=device)
    if init == "zeros":
        return torch.zeros(shape, device=device)
    if init == "values":  # given contents (an MoE layer's annealed settings at step 0)
        return torch.tensor(node.attr["values"], dtype=torch.float32, device=device).reshape(shape)
    if init == "chunks":  # equal chunks of the last dim, each filled with one of the values (dynamics' controller bias)
        values = torch.tensor(node.attr["values"], dtype=torch.float32, device=device)
        return values.repeat_interleave(shape[-1] // len(values)).expand(shape).clone()
    generator = torch.Generator().manual_seed(parameter_seed(seed, node.attr["name"]))
    if init == "uniform":  # U(-std, std): std holds the bound (xavier_uniform experts)
        return ((torch.rand(shape, generator=generator) * 2 - 1) * node.attr["std"]).to(device)
    return (torch.randn(shape, generator=generator) * node.attr["std"]).to(device)
