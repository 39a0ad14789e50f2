"""Checkpoints written in the background (``train.checkpoint.async``) through DCP's ``async_save``.

The training step waits only while DCP stages the state: a copy of every tensor into CPU memory
(pinned on CUDA, so the copy from the device is fast), taken before the next step changes them.
DCP then writes the copy from a thread of its own; a thread of ours waits for that write and, on
rank 0, seals the checkpoint exactly as a synchronous save does (``meta.json``, then
``manifest.json``, then the rename into ``step_NNNNNNNN``). Until then the checkpoint is a hidden
``.tmp-*`` directory, so a process killed mid-write leaves the previous checkpoint as the newest
valid one. At most one write is in flight: a save waits for the previous one first.

Several processes: DCP's write coordinates the ranks (it gathers their write plans and results)
with collectives, which here run on a gloo group of their own, so the background thread never
shares a process group with the training step's collectives (NCCL or gloo). One process: no
process group at all; DCP saves "on a single rank" from its thread, as torch documents for
``async_save`` without an initialised group.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from moec.checkpoint.dcp import begin_checkpoint, commit_checkpoint, removed_on_error, seal_checkpoint, tensor_state

# DCP's thread warns "assuming the intent is to save in a single process" on every one-process save: it is. A
# catch_warnings around async_save cannot reach that thread (the filters are the process's), so the filter stays.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class AsyncCheckpointWriter:
    def __init__(self, dist_ctx):
        self.dist = dist_ctx
        # every rank creates it, in the same order (new_group is collective)
        self.group = dist.new_group(backend="gloo") if dist_ctx.distributed else None
        self.stager = _pinned_stager() if dist_ctx.device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moec-checkpoint")
        self.pending: Future | None = None

    def save(self, run_dir: Path, step: int, model, optimizer, meta: dict, data_fingerprint: str,
             on_commit: Callable[[Path], None] | None = None) -> Path:
        """Stage the state and return; the write and commit go on in the background. Returns the final path."""
        self.wait()
        tmp, final = begin_checkpoint(run_dir, step, self.dist)
        with removed_on_error(tmp, final):
            options = {"async_stager": self.stager} if self.stager is not None else {}
            written = dcp.async_save(tensor_state(model, optimizer), checkpoint_id=str(tmp), process_group=self.group,
                                     no_dist=not self.dist.distributed, **options)
        self.pending = self.pool.submit(self._finish, written, tmp, final, step, meta, data_fingerprint, on_commit)
        return final

    def _finish(self, written: Future, tmp: Path, final: Path, step: int, meta: dict, data_fingerprint: str, on_commit) -> Path:
        with removed_on_error(tmp, final):
            written.result()  # on rank 0: every rank's shards and DCP's .metadata are on disk
            if self.dist.is_main:
                seal_checkpoint(tmp, step, meta, data_fingerprint)
        if self.dist.is_main:
            commit_checkpoint(tmp, final)
            if on_commit is not None:
                on_commit(final)
        return final

    @property
    def in_flight(self) -> bool:
        return self.pending is not None and not self.pending.done()

    def poll(self) -> Path | None:
        """The checkpoint whose write completed since the last call (its error, if it failed), else None."""
        if self.pending is None or not self.pending.done():
            return None
        return self.wait()

    def wait(self) -> Path | None:
        """Block until the write in flight (if any) is complete; re-raises what went wrong in it."""
        pending, self.pending = self.pending, None
        return None if pending is None else pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)
            if self.stager is not None:
                self.stager.close()


def _pinned_stager():
    """DCP's stager copying into pinned CPU memory (reused from one checkpoint to the next)."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    assert torch.cuda.is_available()
    return DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False, use_async_staging=False,
                                        use_non_blocking_copy=False))
