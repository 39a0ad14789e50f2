"""One request to the engine, what the engine sends back for it, and the log-probabilities it reports.

The engine thread fills a request's output queue with :class:`Sampled` items and then
:data:`DONE`. Log-probabilities are ``log_softmax`` in fp32 of the very logits that chose
the token (the prefill's for the prompt, the decode step's for each new token): no second
forward. They are of the model's own distribution, before temperature, top-k and top-p.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from moec.serve.sampling import Sampling

DONE = None  # the last item of a request's output queue


class QueueFull(RuntimeError):
    pass


@dataclass(frozen=True)
class Sampled:
    token: int
    logprob: float | None = None  # log p(token); None where not asked for (and for a prompt's first token)
    top: tuple[tuple[int, float], ...] = ()  # the most likely ids at this position, (id, log p), most likely first


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int  # 0: only the prompt (with ``echo_logprobs``: its log-probabilities)
    sampling: Sampling
    seed: int
    loop: asyncio.AbstractEventLoop
    logprobs: int | None = None  # None: no log-probabilities; k: each token's and the k most likely ids'
    echo_logprobs: bool = False  # also the prompt's (``prompt_scores``), from the prefill over the whole prompt
    stop_tokens: frozenset[int] = frozenset()  # ids that end the request (finish_reason "stop"; not emitted)
    output: asyncio.Queue = field(default_factory=asyncio.Queue)  # Sampled items, then DONE
    prompt_scores: list[Sampled] | None = None  # set by the engine before the first item: one per prompt token
    cancelled: bool = False  # set by the caller (a stop string, a closed stream): the engine drops the request
    generated: int = 0
    last: int = 0  # the newest token, the input of the next step
    position: int = 0  # where ``last`` sits in the sequence
    generator: torch.Generator | None = None
    finish_reason: str = "length"  # "length", "window" (the cache is full), "stop", "cancelled" or "error"
    error: str | None = None  # set when the engine failed on this request (then DONE follows)

    def emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.output.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: it is gone, nothing to tell it
            pass


def scores(logits: torch.Tensor, tokens: list[int], top: int) -> list[Sampled]:
    """[N, V] logits and the N tokens they chose (or were followed by) -> N Sampled with log-probabilities."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, torch.tensor(tokens, dtype=torch.long, device=logprobs.device)[:, None])[:, 0].tolist()
    if top == 0:
        return [Sampled(token, value) for token, value in zip(tokens, chosen)]
    values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
    return [Sampled(token, value, tuple(zip(row_ids, row_values)))
            for token, value, row_ids, row_values in zip(tokens, chosen, ids.tolist(), values.tolist())]


def prompt_scores(logits: torch.Tensor, prompt: list[int], top: int) -> list[Sampled]:
    """The prompt's log-probabilities from its prefill logits [S, V]: none for the first token (nothing predicts it)."""
    return [Sampled(prompt[0])] + scores(logits[:-1], prompt[1:], top)
