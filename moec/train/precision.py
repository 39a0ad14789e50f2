"""``schedule.precision.accumulate``: the matmul accumulators torch may use.

fp32 accumulation is the only value validation accepts (torch cannot be asked for bf16
accumulators). The CPU's bf16 / fp16 matmuls accumulate in fp32 already; CUDA's cuBLAS may reduce
split-K partial sums in bf16 / fp16 unless told not to, which these two switches do.
"""

from __future__ import annotations

import torch


def apply_accumulation(precision) -> None:
    """Keep fp32 accumulation in bf16 / fp16 GEMMs (``precision.accumulate: fp32``)."""
    reduced = precision.accumulate != "fp32"
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced
