"""The server's engine: one thread owns the model and decodes every active request in one batched step.

Requests wait in a bounded queue (:class:`QueueFull` when it is full: HTTP 503). Each of
``slots`` rows of a batch KV cache holds one request: a new request is prefilled alone
(reusing a cached prompt prefix, :mod:`moec.serve.prefix_cache`) and its keys and values are
copied into a free row; then every step runs ``decode_step`` once for all rows, each at its
own position, and samples each row with its request's own seeded generator (so a request's
text does not depend on what else is running). A request ends after ``max_new_tokens``, on
one of its stop tokens, when its row reaches the model's window, or when its caller cancels
it. Models without a decode path are served one request at a time, recomputing the window
per token. Log-probabilities, where a request asks for them, come from the same logits that
sample (:mod:`moec.serve.request`).

With ``speculative`` (``moec serve --speculative``, models with ``head.mtp``) the engine serves one request at a
time: a greedy one (temperature 0) that asks for no log-probabilities is drafted by the MTP modules and verified by
the model (:mod:`moec.serve.speculative`: the same tokens as plain greedy decoding); every other request decodes as
without the flag. ``stats()["speculative"]`` counts the drafts and the accepted ones.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch

from moec.serve.generate import Generator
from moec.serve.prefix_cache import PrefixCache
from moec.serve.request import DONE, QueueFull, Request, Sampled, prompt_scores, scores
from moec.serve.sampling import next_tokens
from moec.serve.speculative import SpeculationStats, speculation_refusal, speculative_stream


class Engine:
    def __init__(self, generator: Generator, slots: int = 8, queue_limit: int = 64, prefix_cache_tokens: int = 8192,
                 speculative: bool = False):
        refusal = speculation_refusal(generator) if speculative else None
        if refusal:
            raise ValueError(refusal)
        self.generator, self.model, self.window = generator, generator.model, generator.window
        self.slots, self.queue_limit = slots if generator.cached and not speculative else 1, queue_limit
        self.speculation = SpeculationStats() if speculative else None
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

    def submit(self, *requests: Request) -> None:
        """Queue every request, or none of them (:class:`QueueFull`) when they do not all fit."""
        with self.lock:
            if len(self.pending) + len(requests) > self.queue_limit:
                self.counts["rejected"] += 1
                raise QueueFull(f"the queue is full ({self.queue_limit} waiting requests); retry later")
            self.counts["requests"] += len(requests)
            self.pending.extend(requests)
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
                "uptime_s": time.time() - self.started, "prefix_cache": self.prefix.stats(),
                **({"speculative": self.speculation.as_dict()} if self.speculation else {})}

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
                    if self._speculates(self.rows[0]):
                        self._speculate_one()
                    else:
                        self._step() if self.generator.cached else self._recompute_one()
                except Exception as err:  # noqa: BLE001 - a failed step ends its requests with the error, not the engine
                    self._fail_active(f"{type(err).__name__}: {err}")
                self.busy_s += time.perf_counter() - started

    def _fail_active(self, message: str) -> None:
        for row, request in enumerate(self.rows):
            if request is not None:
                request.error = message
                self._finish(row, request, "error")

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
            admitted = True
            if request.cancelled:
                self._finish(row, request, "cancelled")
            elif self._speculates(request):
                continue  # _speculate_one reads its prompt
            elif self.generator.cached:
                started = time.perf_counter()
                try:
                    self._prefill(row, request)
                except Exception as err:  # noqa: BLE001 - this request fails; the others go on
                    request.error = f"{type(err).__name__}: {err}"
                    self._finish(row, request, "error")
                self.busy_s += time.perf_counter() - started
        return admitted

    def _prefill(self, row: int, request: Request) -> None:
        """The prompt's KV into ``row`` (its cached prefix copied, the rest computed); the first token sampled.

        A request for the prompt's log-probabilities prefills the whole prompt: the prefix cache
        keeps the logits after a prompt's last token only.
        """
        known, entry = (0, None) if request.echo_logprobs else self.prefix.lookup(request.prompt)
        own = self.model.new_cache(1, self.window)
        if entry is not None:
            for (k, v), (ck, cv) in zip(own, entry.kv):
                k[:, :, :known], v[:, :, :known] = ck, cv
        logits = entry.logits if known == len(request.prompt) else None
        if logits is None:
            device = next(self.model.parameters()).device
            rest = torch.tensor([request.prompt[known:]], dtype=torch.long, device=device)
            every = self.model.prefill(rest, own, start=known)[0]  # [S - known, V]
            if request.echo_logprobs:
                request.prompt_scores = prompt_scores(every, request.prompt, request.logprobs or 0)
            logits = every[-1:]
            self.prefix.store(request.prompt, own, logits)
        for (k, v), (ok, ov) in zip(self.cache, own):
            k[row], v[row] = ok[0], ov[0]
        request.position = len(request.prompt)
        self._sample(row, request, logits)

    def _step(self) -> None:
        """One decode step for every row; idle rows decode a dummy token at position 0 (overwritten on admission)."""
        for row, request in enumerate(self.rows):
            if request is not None and request.cancelled:
                self._finish(row, request, "cancelled")
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
            self._sample(row, request, logits[row:row + 1])

    def _sample(self, row: int, request: Request, logits: torch.Tensor) -> bool:
        """Choose the next token from [1, V] logits and send it; False when the request has ended."""
        if request.generated >= request.max_new_tokens:  # max_tokens 0: the prompt alone
            self._finish(row, request, "length")
            return False
        token = int(next_tokens(logits, request.sampling, request.generator)[0])
        return self._take(row, request, token, logits)

    def _take(self, row: int, request: Request, token: int, logits: torch.Tensor | None = None) -> bool:
        """Send the chosen ``token`` (with log-probabilities from its [1, V] ``logits`` where asked); False when the
        request has ended."""
        if token in request.stop_tokens:
            self._finish(row, request, "stop")
            return False
        request.last = token
        request.generated += 1
        self.counts["tokens"] += 1
        request.emit(scores(logits, [token], request.logprobs)[0] if request.logprobs is not None else Sampled(token))
        if request.generated >= request.max_new_tokens:
            self._finish(row, request, "length")
            return False
        if self.generator.cached and request.position >= self.window:
            self._finish(row, request, "window")
            return False
        return True

    def _finish(self, row: int, request: Request, reason: str) -> None:
        request.finish_reason = reason
        self.rows[row] = None  # before DONE: whoever reads DONE sees the row free
        self.counts["completed"] += 1
        request.emit(DONE)

    def _recompute_one(self) -> None:
        """No decode path (spectral MoE, Sinkhorn routers): the whole request, one forward over the window per token.

        The same arithmetic as :meth:`Generator.stream` without a cache, so the same seed gives the same text.
        """
        request = self.rows[0]
        device = next(self.model.parameters()).device
        tokens = torch.tensor([request.prompt], dtype=torch.long, device=device)
        every = self.model(tokens[:, -self.window:]).output[0]
        if request.echo_logprobs:
            request.prompt_scores = prompt_scores(every, request.prompt, request.logprobs or 0)
        while not request.cancelled and self._sample(0, request, every[-1:]):
            tokens = torch.cat([tokens, torch.tensor([[request.last]], device=device)], 1)
            every = self.model(tokens[:, -self.window:]).output[0]
        if request.cancelled and self.rows[0] is request:
            self._finish(0, request, "cancelled")

    def _speculates(self, request: Request | None) -> bool:
        """Whether the request is drafted and verified: a speculative engine's greedy requests without log-probabilities."""
        return (self.speculation is not None and request is not None and request.sampling.temperature == 0
                and request.logprobs is None and not request.echo_logprobs)

    def _speculate_one(self) -> None:
        """The request in row 0, whole: drafts verified over its own cache, each token sent as plain decoding would."""
        request = self.rows[0]
        request.position = len(request.prompt)
        if request.max_new_tokens == 0:
            self._finish(0, request, "length")
            return
        for token in speculative_stream(self.generator, request.prompt, request.max_new_tokens, self.speculation):
            if request.cancelled:
                self._finish(0, request, "cancelled")
                return
            if not self._take(0, request, token):
                return
            request.position += 1
