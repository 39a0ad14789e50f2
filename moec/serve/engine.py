"""The server's engine: one thread owns the model and decodes every active request in one batched step.

Requests wait in a bounded queue (:class:`QueueFull` when it is full: HTTP 503). Each of
``slots`` rows of a batch KV cache holds one request: a new request is prefilled alone
(reusing a cached prompt prefix, :mod:`moec.serve.prefix_cache`) and its keys and values are
copied into a free row; then every step runs ``decode_step`` once for all rows, each at its
own position, and samples each row with its request's own seeded generator (so a request's
text does not depend on what else is running). A request ends after ``max_new_tokens`` or
when its row reaches the model's window. Models without a decode path are served one request
at a time, recomputing the window per token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from moec.serve.generate import Generator
from moec.serve.prefix_cache import PrefixCache
from moec.serve.sampling import Sampling, next_tokens

DONE = None  # the last item of a request's output queue


class QueueFull(RuntimeError):
    pass


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    seed: int
    loop: asyncio.AbstractEventLoop
    output: asyncio.Queue = field(default_factory=asyncio.Queue)  # token ids, then DONE
    generated: int = 0
    last: int = 0  # the newest token, the input of the next step
    position: int = 0  # where ``last`` sits in the sequence
    generator: torch.Generator | None = None
    finish_reason: str = "length"
    error: str | None = None  # set when the engine failed on this request (then DONE follows)

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.output.put_nowait, item)


class Engine:
    def __init__(self, generator: Generator, slots: int = 8, queue_limit: int = 64, prefix_cache_tokens: int = 8192):
        self.generator, self.model, self.window = generator, generator.model, generator.window
        self.slots, self.queue_limit = slots if generator.cached else 1, queue_limit
        self.pending: deque[Request] = deque()
        self.rows: list[Request | None] = [None] * self.slots
        self.prefix = PrefixCache(prefix_cache_tokens)
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.counts = {"requests": 0, "completed": 0, "rejected": 0, "tokens": 0, "steps": 0, "max_batch": 0}
        self.busy_s, self.started = 0.0, time.time()
        self.cache = self.model.new_cache(self.slots, self.window) if generator.cached else None
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="moec-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> None:
        with self.lock:
            if len(self.pending) >= self.queue_limit:
                self.counts["rejected"] += 1
                raise QueueFull(f"the queue is full ({self.queue_limit} waiting requests); retry later")
            self.counts["requests"] += 1
            self.pending.append(request)
        self.wake.set()

    def stop(self) -> None:
        self.running = False
        self.wake.set()
        self.thread.join(timeout=10)

    def stats(self) -> dict:
        with self.lock:
            queued, active = len(self.pending), sum(row is not None for row in self.rows)
        return {**self.counts, "queue_depth": queued, "active": active, "slots": self.slots, "kv_cache": self.generator.cached,
                "tokens_per_s": self.counts["tokens"] / self.busy_s if self.busy_s else 0.0,
                "uptime_s": time.time() - self.started, "prefix_cache": self.prefix.stats()}

    # --- the engine thread ------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.no_grad():
            while self.running:
                if not self._admit() and not any(self.rows):
                    self.wake.wait(0.05)
                    self.wake.clear()
                    continue
                started = time.perf_counter()
                try:
                    self._step() if self.generator.cached else self._recompute_one()
                except Exception as err:  # noqa: BLE001 - a failed step ends its requests with the error, not the engine
                    self._fail_active(f"{type(err).__name__}: {err}")
                self.busy_s += time.perf_counter() - started

    def _fail_active(self, message: str) -> None:
        for row, request in enumerate(self.rows):
            if request is not None:
                request.error, request.finish_reason = message, "error"
                self._finish(row, request)

    def _admit(self) -> bool:
        admitted = False
        for row in range(self.slots):
            if self.rows[row] is not None:
                continue
            with self.lock:
                if not self.pending:
                    break
                request = self.pending.popleft()
            request.generator = torch.Generator().manual_seed(request.seed)
            self.rows[row] = request
            if self.generator.cached:
                started = time.perf_counter()
                try:
                    self._prefill(row, request)
                except Exception as err:  # noqa: BLE001 - this request fails; the others go on
                    request.error, request.finish_reason = f"{type(err).__name__}: {err}", "error"
                    self._finish(row, request)
                self.busy_s += time.perf_counter() - started
            admitted = True
        return admitted

    def _prefill(self, row: int, request: Request) -> None:
        """The prompt's KV into ``row`` (its cached prefix copied, the rest computed); the first token sampled."""
        known, entry = self.prefix.lookup(request.prompt)
        own = self.model.new_cache(1, self.window)
        if entry is not None:
            for (k, v), (ck, cv) in zip(own, entry.kv):
                k[:, :, :known], v[:, :, :known] = ck, cv
        logits = entry.logits if known == len(request.prompt) else None
        if logits is None:
            device = next(self.model.parameters()).device
            rest = torch.tensor([request.prompt[known:]], dtype=torch.long, device=device)
            logits = self.model.prefill(rest, own, start=known)[:, -1]
            self.prefix.store(request.prompt, own, logits)
        for (k, v), (ok, ov) in zip(self.cache, own):
            k[row], v[row] = ok[0], ov[0]
        request.position = len(request.prompt)
        self._emit(row, request, next_tokens(logits, request.sampling, request.generator)[0])

    def _step(self) -> None:
        """One decode step for every row; idle rows decode a dummy token at position 0 (overwritten on admission)."""
        active = [(row, r) for row, r in enumerate(self.rows) if r is not None]
        if not active:
            return
        device = next(self.model.parameters()).device
        tokens = torch.zeros(self.slots, 1, dtype=torch.long, device=device)
        positions = [0] * self.slots
        for row, request in active:
            tokens[row, 0], positions[row] = request.last, request.position
        logits = self.model.decode_step(tokens, self.cache, positions)
        self.counts["steps"] += 1
        self.counts["max_batch"] = max(self.counts["max_batch"], len(active))
        for row, request in active:
            request.position += 1
            self._emit(row, request, next_tokens(logits[row:row + 1], request.sampling, request.generator)[0])

    def _emit(self, row: int, request: Request, token: torch.Tensor) -> None:
        request.last = int(token)
        request.generated += 1
        self.counts["tokens"] += 1
        request.emit(request.last)
        if request.generated >= request.max_new_tokens or request.position >= self.window:
            request.finish_reason = "length" if request.generated >= request.max_new_tokens else "window"
            self._finish(row, request)

    def _finish(self, row: int, request: Request) -> None:
        request.emit(DONE)
        self.rows[row] = None
        self.counts["completed"] += 1

    def _recompute_one(self) -> None:
        """No decode path (spectral MoE, Sinkhorn routers): the whole request, one token per full window."""
        request = self.rows[0]
        stream = self.generator.stream(request.prompt, request.max_new_tokens, request.sampling, request.seed)
        for token in stream:
            request.generated += 1
            self.counts["tokens"] += 1
            request.emit(token)
        self._finish(0, request)
