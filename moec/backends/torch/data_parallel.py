"""What a generated model sums over the whole batch: the data-parallel group's expert counts.

With ``aux.load_balance_batch: global`` each MoE layer's expert counts are summed over every
rank that reads a slice of the batch before they enter the load-balance loss, so N processes
compute the loss of one process on the whole batch (the router's mean scores stay per rank:
averaging the gradients over the ranks completes their mean). The layer holds the group as
``self.batch_group``, which the generated ``parallel.py`` sets (``use_batch_group``); without
one (a single process) the sums are the identity. Copied into a build's ``model_support.py``.

The sum is a functional collective, so ``torch.compile`` traces it into the graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def batch_counts(counts: torch.Tensor, group: dist.ProcessGroup | None, tokens: int) -> tuple[torch.Tensor, torch.Tensor | int]:
    """``counts`` and this rank's ``tokens`` summed over the ranks of ``group`` (one all-reduce). The ranks of a
    context-parallel group can hold unequal token counts (a spectral MoE's rfft bins), so N is summed, not multiplied."""
    if group is None:
        return counts, tokens
    total = funcol.all_reduce(torch.cat([counts, counts.new_tensor([tokens])]), "sum", group)
    return total[:-1], total[-1]


def global_load_balance_loss(scores: torch.Tensor, counts: torch.Tensor, experts: int,
                             group: dist.ProcessGroup | None) -> torch.Tensor:
    """load_balance_loss with c_e and N over every data-parallel rank's tokens (aux.load_balance_batch 'global')."""
    total, tokens = batch_counts(counts, group, scores.shape[0])
    probs = scores / scores.sum(-1, keepdim=True)
    return experts * torch.sum(total.to(probs.dtype) / tokens * probs.mean(0))
