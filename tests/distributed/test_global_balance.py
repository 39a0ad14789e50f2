"""``aux.load_balance_batch: global``: 2 gloo processes, each with half the batch, give the
load-balance loss and router gradient of one process on the whole batch; the default (local)
counts do not (that difference is why the option exists)."""

import functools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moec.backends.torch.data_parallel import global_load_balance_loss
from moec.backends.torch.snippets import load_balance_loss

EXPERTS, TOKENS = 4, 16


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Router scores of the whole batch and their top-1 expert counts, skewed differently in each half."""
    logits = torch.randn(TOKENS, EXPERTS, generator=torch.Generator().manual_seed(0))
    logits[: TOKENS // 2, 0] += 3.0  # the first rank's tokens prefer expert 0
    return logits.softmax(-1), logits


def counts_of(scores: torch.Tensor) -> torch.Tensor:
    return torch.bincount(scores.argmax(-1), minlength=EXPERTS)


def loss_and_grad(loss_fn, logits: torch.Tensor) -> tuple[float, torch.Tensor]:
    logits = logits.clone().requires_grad_()
    scores = logits.softmax(-1)
    loss = loss_fn(scores, counts_of(scores.detach()), EXPERTS)
    loss.backward()
    return loss.item(), logits.grad


def worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _, logits = batch()
        half = logits.chunk(2)[rank]
        over_world = functools.partial(global_load_balance_loss, group=dist.group.WORLD)  # the layer's batch_group
        for name, fn in (("global", over_world), ("local", load_balance_loss)):
            loss, grad = loss_and_grad(fn, half)
            value = torch.tensor([loss])
            dist.all_reduce(value, op=dist.ReduceOp.AVG)  # what the trainer logs: the mean over ranks
            grads = [torch.empty_like(grad) for _ in range(2)]
            dist.all_gather(grads, grad / 2)  # a data-parallel gradient average, per rank's rows
            if rank == 0:
                results[name] = (value.item(), torch.cat(grads))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_global_counts_give_the_whole_batch_loss_and_gradient():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(worker, args=(free_port(), results), nprocs=2, start_method="spawn", join=True)
        results = dict(results)
    _, logits = batch()
    whole_loss, whole_grad = loss_and_grad(load_balance_loss, logits)
    loss, grad = results["global"]
    assert loss == pytest.approx(whole_loss, rel=1e-6)
    assert torch.allclose(grad, whole_grad, rtol=1e-5, atol=1e-8)
    local_loss, _ = results["local"]
    assert abs(local_loss - whole_loss) > 0.05 * whole_loss  # per-rank counts: another loss


def test_without_a_group_the_global_loss_is_the_local_one():
    scores, _ = batch()
    counts = counts_of(scores)
    assert torch.equal(global_load_balance_loss(scores, counts, EXPERTS, None), load_balance_loss(scores, counts, EXPERTS))
