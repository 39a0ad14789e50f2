"""The expert-parallel exchange of one training step: what ``dispatch_experts`` sent off-rank.

The counters live in the build's ``model_support.py`` (its ``SENT`` dict), bumped by every all-to-all of the
dispatch, forward and backward; the trainer resets them before a step and sums them over ranks after it.
"""

from __future__ import annotations

import torch

from moec.backends.torch.loader import support_module


def rows_sent(program) -> dict:
    """The counters of the program's ``dispatch_experts``; fresh ones when the program has none."""
    module = support_module(program.source, program.support_source)
    return getattr(module, "SENT", {"bytes": 0, "undeduplicated": 0, "destinations": 0})


def reset(program) -> None:
    """Start a step's count (evaluation's all-to-alls are not the step's)."""
    rows_sent(program).update(bytes=0, undeduplicated=0, destinations=0)


def step_bytes(program) -> dict:
    """This step's exchange over all ranks: the bytes sent off-rank, what one row per (token, choice) would have
    sent, and the most ranks one token's rows reached."""
    sent = rows_sent(program)
    totals = torch.tensor([sent["bytes"], sent["undeduplicated"]], dtype=torch.float64)
    torch.distributed.all_reduce(totals)
    destinations = torch.tensor([sent["destinations"]])
    torch.distributed.all_reduce(destinations, op=torch.distributed.ReduceOp.MAX)
    return {"expert_parallel_bytes_sent": int(totals[0]), "expert_parallel_bytes_undeduplicated": int(totals[1]),
            "expert_parallel_destinations": int(destinations)}
