"""Running one training job on many processes: the process group, the mesh, the launcher.

``moec train`` works unchanged under ``torchrun`` (it reads RANK / WORLD_SIZE / LOCAL_RANK),
and ``moec train --nproc N`` starts torchrun's elastic launcher itself. gloo on the CPU,
NCCL on CUDA with one device per local rank. The data-parallel coordinate of a rank says
which slice of each global batch it reads, so a run on N processes sees exactly the batches
of the single-process run.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moec.backends.torch.context_parallel import load_balanced_positions  # the split model.py's attention assumes


class LaunchError(RuntimeError):
    """The job cannot start or a rank failed: one line for the user."""


class JobStopped(RuntimeError):
    """The job stopped on SIGINT / SIGTERM after its ranks saved a checkpoint: exit with ``code``."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


STOP_CODES = {130: "SIGINT", 143: "SIGTERM"}  # a rank's exit code after a signal it handled


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object = None  # DeviceMesh, when world_size > 1
    dp_rank: int = 0  # position among the data-parallel ranks
    dp_size: int = 1
    cp_rank: int = 0  # position in the context-parallel group (sharding.sequence): which chunks of each sequence
    cp_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def mean(self, value: float) -> float:
        """The mean of a per-rank number over all ranks (losses of the ranks' batch slices)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(spec, parallel, device: str | None, timeout_s: float = 120.0) -> DistContext:
    """Join the process group torchrun set up; ``parallel`` is the generated parallel.py module."""
    world = launched_world_size()
    expected = spec.mesh.world_size
    if world != expected:
        raise LaunchError(f"the spec's mesh has world_size {expected}, but {world} process(es) were started "
                          f"(use moec train --nproc {expected}, or torchrun --nproc-per-node {expected})")
    if world == 1:
        return DistContext(device=_device(device, 0))
    if parallel.UNSUPPORTED:
        raise LaunchError(f"this spec asks for {', '.join(parallel.UNSUPPORTED)}, which moec does not execute yet; "
                          "train it with mesh axes of size 1 there")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    mesh = parallel.make_mesh(dev.type)
    dp_axes = tuple(parallel.DATA_PARALLEL)
    dp_rank, dp_size = 0, 1
    for axis in dp_axes:  # row-major over the data-parallel axes, in mesh order
        size = mesh[axis].size()
        dp_rank, dp_size = dp_rank * size + mesh[axis].get_local_rank(), dp_size * size
    cp_axes = tuple(getattr(parallel, "CONTEXT_PARALLEL", ()))  # one axis at most (validated)
    cp_rank, cp_size = (mesh[cp_axes[0]].get_local_rank(), mesh[cp_axes[0]].size()) if cp_axes else (0, 1)
    return DistContext(dist.get_rank(), world, dev, mesh, dp_rank, dp_size, cp_rank, cp_size)


def _device(requested: str | None, local_rank: int) -> torch.device:
    if requested in (None, "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if requested == "cuda":
        raise LaunchError("--device cuda was asked for, but torch sees no CUDA device here")
    if requested not in (None, "cpu"):
        raise LaunchError(f"unknown --device {requested!r}; use cpu or cuda")
    return torch.device("cpu")


# What gloo's RuntimeError says when a collective waited past the group's timeout: a receive ("Timed out
# waiting ..."), or an all-to-all whose peer stopped answering ("Application timeout caused pair closure").
GLOO_TIMEOUTS = ("Timed out waiting", "Application timeout caused pair closure")


def timed_out(err: BaseException) -> bool:
    """Whether ``err`` is a collective that waited past the process group's timeout (gloo raises a
    RuntimeError naming it; NCCL's watchdog a DistBackendError)."""
    return isinstance(err, dist.DistBackendError) or (isinstance(err, RuntimeError) and any(text in str(err) for text in GLOO_TIMEOUTS))


def local_slice(batch: torch.Tensor, ctx: DistContext, by_position: bool = True) -> torch.Tensor:
    """This rank's rows of a global batch (the batch divides by the data-parallel size: validated), and under
    context parallelism its positions of each row: chunks cp_rank and 2*cp-1-cp_rank of 2*cp (the sequence divides).
    ``by_position`` False: one target per row (head.pool 'last'), which every cp rank reads whole."""
    if ctx.dp_size > 1:
        rows = batch.shape[0] // ctx.dp_size
        batch = batch[ctx.dp_rank * rows:(ctx.dp_rank + 1) * rows]
    if ctx.cp_size > 1 and by_position:
        positions = load_balanced_positions(batch.shape[1] // ctx.cp_size, ctx.cp_rank, ctx.cp_size)
        batch = batch.index_select(1, positions.to(batch.device))
    return batch


def launch(nproc: int, argv: list[str], shutdown_timeout_s: float = 120.0) -> None:
    """Run ``moec <argv>`` on ``nproc`` local processes through torch's elastic launcher.

    SIGINT / SIGTERM reach the launcher (the workers run in sessions of their own): it forwards the
    signal to every worker and waits up to ``shutdown_timeout_s`` while they finish the step and save."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="127.0.0.1:0", run_id=f"moec-{os.getpid()}", max_restarts=0, monitor_interval=0.5,
                          shutdown_timeout=max(1, math.ceil(shutdown_timeout_s)))
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "moec.cli.main", *argv)
    except SignalException as err:
        raise JobStopped(128 + err.sigval.value) from None
    except ChildFailedError as err:
        rank, first = err.get_first_failure()
        if first.exitcode in STOP_CODES:  # a signal on one rank: all ranks stopped after one step, and saved
            raise JobStopped(first.exitcode) from None
        others = sorted(set(err.failures) - {rank})
        tail = f"; the launcher stopped rank(s) {', '.join(map(str, others))}" if others else ""
        raise LaunchError(f"rank {rank} failed first ({_exit_reason(first.exitcode)}){tail}; "
                          "each rank's own error is printed above") from None


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"



def clip_grad_norm(params: list, max_norm: float) -> float:
    """``clip_grad_norm_`` that also works when gradients are DTensors on different meshes (expert
    weights sharded over ep, the rest replicated or sharded over the data-parallel axes): each
    gradient's norm is reduced over its own mesh, then the squares add up."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(hasattr(g, "device_mesh") for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    norms = [torch.linalg.vector_norm(g) for g in grads]
    total = torch.stack([n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]).norm().item()
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1.0:
        for g in grads:
            g.mul_(coefficient)
    return total
