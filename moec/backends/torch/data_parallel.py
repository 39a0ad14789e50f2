"""The data-parallel group of a run: what a generated model sums over the whole batch.

With ``aux.load_balance_batch: global`` each MoE layer's expert counts are summed over every
rank that reads a slice of the batch before they enter the load-balance loss, so N processes
compute the loss of one process on the whole batch (the router's mean scores stay per rank:
averaging the gradients over the ranks completes their mean). The generated ``parallel.py``
sets the group; without one (a single process) the sums are the identity.

The sum is a functional collective, so ``torch.compile`` traces it into the graph.
"""

from __future__ import annotations

import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

_GROUP: dict[str, dist.ProcessGroup | None] = {"group": None}


def set_batch_group(group: dist.ProcessGroup | None) -> None:
    """The ranks that split the batch (every data-parallel axis), or None for a single process."""
    _GROUP["group"] = group


def batch_counts(counts: Tensor) -> tuple[Tensor, int]:
    """``counts`` summed over the data-parallel ranks, and how many ranks there are."""
    group = _GROUP["group"]
    if group is None:
        return counts, 1
    return funcol.all_reduce(counts, "sum", group), dist.get_world_size(group)
