"""Model FLOPs utilisation: the manifest's training FLOPs per token x tokens/s over the device's peak.

Peaks are the vendors' dense (no sparsity) tensor-core figures per GPU, by the name torch
reports; a device not listed (any CPU) has no MFU rather than a guessed one. Training FLOPs
per token are the manifest's ``flops_per_token.training`` (3 x forward, attention at
``train.seq_len``), the convention of PaLM's MFU.
"""

from __future__ import annotations

# name fragment -> {compute precision: peak FLOP/s}, dense
PEAKS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
}


def device_peak(device_name: str, precision: str) -> tuple[str, float] | None:
    """``(matched name, peak FLOP/s)`` for a device name as torch.cuda.get_device_name gives it, or None."""
    for fragment, peaks in PEAKS.items():  # longest fragments first where they overlap ("H100 PCIe" before "H100")
        if fragment in device_name and precision in peaks:
            return fragment, peaks[precision]
    return None


def mfu(tokens_per_s: float, training_flops_per_token: float, device_name: str, precision: str) -> tuple[str, float] | None:
    """``(device, fraction of its peak)``, or None where the peak is not known."""
    peak = device_peak(device_name, precision)
    if peak is None or tokens_per_s <= 0:
        return None
    return peak[0], tokens_per_s * training_flops_per_token / peak[1]
