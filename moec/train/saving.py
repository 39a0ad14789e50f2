"""A run's checkpoints: written now or in the background (``train.checkpoint.async``), then pruned.

``keep_last`` and ``keep_best`` are applied around each save (``moec.checkpoint.dcp``: room for
one more is made first, the rest pruned once the new one is committed). With ``async`` the commit
happens when the background write completes, so the pruning after it runs then too; a save waits
for the previous write, so two writes never overlap and the pruning sees committed checkpoints only.
"""

from __future__ import annotations

from pathlib import Path

from moec.checkpoint import dcp as ckpt


class RunCheckpoints:
    def __init__(self, run_dir: Path, policy, dist_ctx):
        self.run_dir, self.policy, self.dist = Path(run_dir), policy, dist_ctx
        self.writer = None
        if policy.async_:
            from moec.checkpoint.async_write import AsyncCheckpointWriter

            self.writer = AsyncCheckpointWriter(dist_ctx)

    def save(self, step: int, model, optimizer, meta: dict, data_fingerprint: str, val_at: dict) -> tuple[Path, bool]:
        """Write the checkpoint of ``step``: (its path, whether it is still being written)."""
        if self.writer is not None:
            self.writer.wait()  # the previous write is committed (and pruned after) before this one is planned
        best = set()
        if self.dist.is_main:
            best = ckpt.best_steps(val_at, ckpt.checkpoint_steps(self.run_dir) | {step}, int(self.policy.keep_best))
            ckpt.prune_before_save(self.run_dir, self.policy.keep_last, best)

        def prune(_path=None) -> None:
            if self.dist.is_main:
                ckpt.prune(self.run_dir, self.policy.keep_last, best)

        if self.writer is None:
            path = ckpt.save_checkpoint(self.run_dir, step, model, optimizer, meta, data_fingerprint, self.dist)
            prune()
            return path, False
        return self.writer.save(self.run_dir, step, model, optimizer, meta, data_fingerprint, on_commit=prune), True

    def poll(self) -> Path | None:
        """A background write that completed since the last call: its checkpoint (raises what went wrong in it)."""
        return self.writer.poll() if self.writer is not None else None

    def wait(self) -> Path | None:
        """Until the write in flight is complete (SIGINT / SIGTERM and the end of training come here)."""
        return self.writer.wait() if self.writer is not None else None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
