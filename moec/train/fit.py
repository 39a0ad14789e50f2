"""Will the run fit? Checked before anything is allocated.

Per device: the manifest's parameters + gradients + AdamW state under the spec's mesh and
precision, plus a rough activation estimate (the inputs of every matmul of every block kept
for backward: ``micro_batch x seq x d_model x 16`` values per block, a lower bound for
attention + MoE blocks). Available: free CUDA memory, or the host's MemAvailable shared by
the processes of this machine.
"""

from __future__ import annotations

import os

import torch

ACTIVATION_VALUES_PER_TOKEN_AND_WIDTH = 16  # per block: norms, q/k/v/o, router, expert rows (k=2), residuals


def needed_bytes(spec, manifest: dict, dp_size: int) -> tuple[int, int]:
    """(params + grads + optimizer, activations) in bytes for one device."""
    train, model = spec.train, spec.model
    rows = train.batch // train.grad_accum // max(dp_size, 1) * train.seq_len
    mtp = getattr(model.head, "mtp", None)
    blocks = model.num_layers + (mtp.depth if mtp is not None else 0)  # each MTP depth runs one more block in training
    activations = rows * model.d_model * blocks * ACTIVATION_VALUES_PER_TOKEN_AND_WIDTH * 4
    return manifest["memory_per_device"]["total_bytes"], activations


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as handle:
        info = dict(line.split(":", 1) for line in handle)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(info["MemAvailable"].split()[0]) * 1024 // local


def check_fit(spec, manifest: dict, device: torch.device, dp_size: int) -> str | None:
    """None when the run fits, else one line for the user."""
    state, activations = needed_bytes(spec, manifest, dp_size)
    have = available_bytes(device)
    if state + activations <= have:
        return None
    source = spec.source
    where = source.locate(("model",), at_key=True) if source is not None else None
    at = f"{source.file}:{where[0]}: " if where else ""
    gib = 2**30
    return (f"{at}the run needs about {(state + activations) / gib:.1f} GiB per device (parameters, gradients and AdamW "
            f"{state / gib:.1f} GiB, activations ~{activations / gib:.1f} GiB) but {device.type} has {have / gib:.1f} GiB "
            "available; make the model smaller, or shard it over more devices (mesh, sharding.fsdp)")
