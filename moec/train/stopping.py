"""Stopping a run on SIGINT / SIGTERM at a step every rank agrees on.

A signal only marks the stop as pending. The training loop asks ``poll`` after each step (and
the evaluation after each batch): on one process the pending signal becomes the stop at once;
on several, the ranks take the maximum of their pending signals in one small all-reduce, so a
signal that reached one rank (``kill`` of one process) or reached the ranks a step apart (the
launcher forwards Ctrl-C to each process in turn) stops all of them after the same step, and the
checkpoint they write together is of one step. A second signal on a rank aborts it at once.
"""

from __future__ import annotations

import contextlib
import signal

import torch
import torch.distributed as dist

STOP_AT = "--stop-at"  # a planned stop, the same on every rank: no agreement needed


class StopRequest:
    def __init__(self):
        self.pending: str | None = None  # a signal seen by this rank, not yet agreed on
        self.reason: str | None = None  # why the loop stops after this step: a signal name or STOP_AT

    @property
    def signalled(self) -> bool:
        return self.reason not in (None, STOP_AT)

    def plan(self) -> None:
        self.reason = self.reason or STOP_AT

    def poll(self, distributed: bool, device) -> bool:
        """Whether the ranks stop now on a signal (one all-reduce when ``distributed``)."""
        code = signal.Signals[self.pending].value if self.pending else 0
        if distributed:
            agreed = torch.tensor([code], dtype=torch.int64, device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            code = int(agreed.item())
        if code and not self.signalled:
            self.reason = signal.Signals(code).name
        return self.signalled

    @contextlib.contextmanager
    def handlers(self, on_second):
        """Catch SIGINT / SIGTERM for the block; ``on_second(name)`` returns the exception a second raises."""
        def stop(signum, frame):
            name = signal.Signals(signum).name
            if self.pending or self.signalled:
                raise on_second(name)
            self.pending = name

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
