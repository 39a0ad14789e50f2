"""The cross-entropy of logits that may be split along the vocabulary over tensor-parallel ranks.

With the vocabulary split (``embed`` / ``head`` in ``sharding.tensor.column``), the head's logits stay
split: each rank holds V / tp columns. torch's ``loss_parallel`` computes the loss from them (max, sum
of exponentials and the target's logit reduced over tp; no rank gathers [B, S, V]).
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel


def cross_entropy(logits: Tensor, targets: Tensor, vocab_mesh: DeviceMesh | None = None) -> Tensor:
    """The mean cross-entropy of ``logits`` [..., V] (fp32) against ``targets`` [...]. With ``vocab_mesh`` the
    logits are this rank's V / tp columns: torch's ``loss_parallel`` reduces over the mesh; the backward must
    run inside ``loss_context(vocab_mesh)``."""
    flat, flat_targets = logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if vocab_mesh is None:
        return F.cross_entropy(flat, flat_targets)
    with _loss_parallel():
        return F.cross_entropy(DTensor.from_local(flat, vocab_mesh, [Shard(1)]), flat_targets).to_local()


def loss_context(vocab_mesh: DeviceMesh | None) -> contextlib.AbstractContextManager:
    """Where the backward of a vocab-parallel ``cross_entropy`` runs (torch's ``loss_parallel``); else nothing."""
    return _loss_parallel() if vocab_mesh is not None else contextlib.nullcontext()


_LOSS_PARALLEL_DEPTH = [0]


@contextlib.contextmanager
def _loss_parallel():
    """torch's ``loss_parallel``, re-entrant: leaving it switches its loss ops off for everyone, so a loss computed
    inside an enclosing one (the pipeline schedule runs the loss and its backward in one step) must not leave it."""
    if _LOSS_PARALLEL_DEPTH[0]:
        yield
        return
    _LOSS_PARALLEL_DEPTH[0] += 1
    try:
        with loss_parallel():
            yield
    finally:
        _LOSS_PARALLEL_DEPTH[0] -= 1
