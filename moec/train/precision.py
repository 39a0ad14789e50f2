"""``schedule.precision.accumulate``: the matmul accumulators torch may use; where ``compute: fp8`` runs.

fp32 accumulation is the only value validation accepts (torch cannot be asked for bf16
accumulators). The CPU's bf16 / fp16 matmuls accumulate in fp32 already; CUDA's cuBLAS may reduce
split-K partial sums in bf16 / fp16 unless told not to, which these two switches do.
"""

from __future__ import annotations

import torch

FP8_CAPABILITY = (8, 9)  # Ada and Hopper: the first with fp8 tensor cores


def apply_accumulation(precision) -> None:
    """Keep fp32 accumulation in bf16 / fp16 GEMMs (``precision.accumulate: fp32``)."""
    reduced = precision.accumulate != "fp32"
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced


def fp8_emulated(device: torch.device) -> bool:
    """``compute: fp8`` on ``device``: False for real fp8 GEMMs (CUDA, compute capability >= 8.9), True for torchao's
    emulation on the CPU (the same casts and scales, high-precision GEMMs: numerics, not speed); ValueError otherwise.
    Rowwise scales on sm89 (Ada) need torch >= 2.7, whose RowwiseScaledMM kernel is built for it (sm90 before)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_CAPABILITY:
        return False
    found = f"sm{''.join(map(str, torch.cuda.get_device_capability(device)))}" if device.type == "cuda" else device.type
    raise ValueError(f"schedule.precision.compute fp8 needs a CUDA device of compute capability >= 8.9 (Ada, Hopper) "
                   f"or the CPU's emulation; this device is {found}: use bf16")


def float8_model(parallel, model: torch.nn.Module, device: torch.device, log=None) -> torch.nn.Module:
    """``compute: fp8``: the generated parallel.py's ``float8_training`` on ``model`` (its projections become torchao
    Float8Linear), real on CUDA sm89+, emulated on the CPU; ValueError on other devices, or when the model has no
    projection to convert (the field would do nothing). ``log``: one line saying what runs in fp8."""
    if not parallel.FLOAT8_LINEARS:
        raise ValueError(f"schedule.precision.compute fp8 converts no projection of this model (kept bf16: "
                         f"{', '.join(parallel.FLOAT8_KEPT) or 'no nn.Linear'}; routers and experts stay bf16): use bf16")
    emulate = fp8_emulated(device)
    if log:
        kept = ", ".join(parallel.FLOAT8_KEPT) or "none"
        log(f"fp8 ({'emulated on the CPU' if emulate else 'rowwise, torchao'}): {len(parallel.FLOAT8_LINEARS)} projection "
            f"roles; bf16: {kept}, routers, experts")
    return parallel.float8_training(model, emulate=emulate)
