"""Events of choices -> OpenAI's JSON: whole completions and chat completions, and their server-sent-event chunks.

A whole answer folds each choice's events (:mod:`moec.serve.choices`); a stream sends one
chunk per event that carries text, log-probabilities or a finish reason, then (with
``stream_options.include_usage``) a chunk with the usage and no choices, then ``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from moec.serve.choices import Event, Scored
from moec.serve.openai_errors import APIError, error_body


@dataclass(frozen=True)
class Answer:
    """What every chunk and the whole answer repeat."""

    kind: str  # "text_completion" or "chat.completion"
    model: str
    prompt_tokens: int
    logprobs: bool  # completions only: whether choices carry a logprobs object
    id: str = ""
    created: int = 0

    @classmethod
    def new(cls, kind: str, model: str, prompt_tokens: int, logprobs: bool = False) -> "Answer":
        prefix = "cmpl" if kind == "text_completion" else "chatcmpl"
        return cls(kind, model, prompt_tokens, logprobs, f"{prefix}-{uuid.uuid4().hex}", int(time.time()))

    def head(self, chunk: bool = False) -> dict:
        kind = self.kind + (".chunk" if chunk and self.kind == "chat.completion" else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}


def logprobs_object(tokens: list[Scored]) -> dict:
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [t.top for t in tokens], "text_offset": [t.offset for t in tokens]}


def whole(answer: Answer, events: list[Event], choices: int) -> dict:
    """The non-streamed answer: each choice's text, log-probabilities and finish reason; the usage."""
    texts, tokens, finish = [[] for _ in range(choices)], [[] for _ in range(choices)], [None] * choices
    for event in events:
        texts[event.index].append(event.text)
        tokens[event.index] += event.tokens
        finish[event.index] = event.finish_reason or finish[event.index]
    rows = []
    for index in range(choices):
        text = "".join(texts[index])
        if answer.kind == "chat.completion":
            rows.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish[index]})
        else:
            rows.append({"index": index, "text": text, "logprobs": logprobs_object(tokens[index]) if answer.logprobs else None,
                         "finish_reason": finish[index]})
    return answer.head() | {"choices": rows, "usage": answer.usage(sum(e.generated for e in events))}


def _choice_chunk(answer: Answer, event: Event, first: bool) -> dict:
    if answer.kind == "chat.completion":
        delta = {"role": "assistant", "content": event.text} if first else {"content": event.text} if event.text else {}
        return {"index": event.index, "delta": delta, "logprobs": None, "finish_reason": event.finish_reason}
    return {"index": event.index, "text": event.text, "logprobs": logprobs_object(event.tokens) if answer.logprobs else None,
            "finish_reason": event.finish_reason}


def sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream(answer: Answer, events: AsyncIterator[Event], include_usage: bool, on_close) -> AsyncIterator[str]:
    """Server-sent events: one chunk per event with content, then the usage (if asked) and ``[DONE]``.

    An error after the stream began is a last ``data: {"error": ...}`` before ``[DONE]``;
    ``on_close`` runs however the stream ends (a client that goes away cancels its requests).
    """
    started, generated = set(), 0
    try:
        async for event in events:
            generated += event.generated
            first = event.index not in started
            if not (event.text or event.tokens or event.finish_reason or first):
                continue
            started.add(event.index)
            yield sse(answer.head(chunk=True) | {"choices": [_choice_chunk(answer, event, first)]})
        if include_usage:
            yield sse(answer.head(chunk=True) | {"choices": [], "usage": answer.usage(generated)})
    except APIError as err:
        yield sse(error_body(err.status, err.message, err.param, err.code))
    finally:
        on_close()
    yield sse("[DONE]")
