"""What generated ``model.py`` files import from moec: the unfused ops, run by the reference interpreter.

The grouped GEMM (``grouped_linear``) lives in ``moec.backends.torch.grouped``, which each build
copies into its ``model_support.py``; it is re-exported here for moec's own callers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moec.backends.torch.grouped import NATIVE_DTYPES, grouped_linear

__all__ = ["NATIVE_DTYPES", "grouped_linear", "reference_op"]


def reference_op(op: str, attrs: dict, training: bool, seq: int, *args: Tensor):
    """An unfused routing / spectral op, run by the reference interpreter's kernel.

    Generated code calls this only when a fusion pass was disabled: correct, eager and slow
    (per-expert loops), and ``torch.compile`` breaks the graph here.
    """
    from moec.backends.reference.interpreter import KERNELS, Context

    ctx = Context(training=training, device=args[0].device if args else torch.device("cpu"), symbols={"S": seq})
    return KERNELS[op](ctx, attrs, *args)
