"""The OpenAI-compatible routes of ``moec serve``, on the same engine as ``POST /generate``.

``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, and the
tokenizer routes that lm-evaluation-harness and vLLM clients use: ``POST /tokenize``,
``POST /detokenize``, ``GET /tokenizer_info``. A request becomes one engine request per
prompt and choice (``n``), all queued at once or none (503); choice ``i`` of a prompt samples
with ``seed + i``.
"""

from __future__ import annotations

import random

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from moec.serve import openai_format as fmt
from moec.serve.chat import DEFAULT_TEMPLATE, render_chat
from moec.serve.choices import Job, collect, events, merged, submit
from moec.serve.engine import Engine
from moec.serve.openai_errors import APIError
from moec.serve.openai_schema import ChatRequest, CompletionRequest, DetokenizeRequest, SamplingFields, TokenizeRequest
from moec.serve.sampling import Sampling


class OpenAI:
    """The served model's id, its engine and codec, and what the routes need from them."""

    def __init__(self, engine: Engine, codec, model_id: str, vocab: int, created: int):
        self.engine, self.codec, self.model_id, self.vocab, self.created = engine, codec, model_id, vocab, created
        self.window = engine.window

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_id!r}", "model",
                           "model_not_found")

    def prompt_ids(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """A prompt's token ids, checked as every route checks them (:meth:`Generator.check_prompt`): a 400 naming
        the problem (an empty prompt, an id past the vocabulary, more tokens than the window)."""
        ids: list[int] = []
        try:
            ids = self.codec.encode(prompt) if isinstance(prompt, str) else prompt
            self.engine.generator.check_prompt(ids)
        except ValueError as err:
            code = "context_length_exceeded" if len(ids) > self.window else "invalid_prompt"
            raise APIError(400, str(err), param, code) from None
        return ids

    def jobs(self, body: SamplingFields, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None = None,
             echoes: list[str] | None = None) -> list[Job]:
        """prompt-major, then the n choices of each prompt; None max_tokens: up to the window."""
        try:
            sampling = Sampling(body.temperature, body.top_k, body.top_p)
        except ValueError as err:
            raise APIError(400, str(err), None, "invalid_value") from None
        if len(prompts) * body.n > self.engine.queue_limit:
            raise APIError(400, f"this request needs {len(prompts) * body.n} generations (prompts x n); the server queues "
                           f"at most {self.engine.queue_limit} (--queue)", "n", "too_many_choices")
        seed = body.seed if body.seed is not None else random.randrange(2**62)
        return [Job(p * body.n + i, ids, self.window - len(ids) if max_tokens is None else max_tokens, sampling, seed + i,
                    tuple(body.stops()), logprobs, echoes[p] if echoes else None)
                for p, ids in enumerate(prompts) for i in range(body.n)]

    async def answer(self, answer: fmt.Answer, body: SamplingFields, jobs: list[Job]):
        requests = submit(self.engine, jobs, self.codec.stop_ids)
        streams = [events(job, request, self.codec) for job, request in zip(jobs, requests)]

        def cancel():
            for request in requests:
                request.cancelled = True

        if body.stream:
            include = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(fmt.stream(answer, merged(streams), include, cancel), media_type="text/event-stream")
        try:
            return fmt.whole(answer, await collect(merged(streams)), len(jobs))
        finally:
            cancel()

    def chat_prompt(self, body_messages) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {}) for m in body_messages]
        try:
            text = render_chat(messages, self.codec.chat_template, self.codec.special)
        except ValueError as err:
            raise APIError(400, str(err), "messages", "invalid_messages") from None
        return self.prompt_ids(text, "messages")


def openai_router(api: OpenAI) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": api.model_id, "object": "model", "created": api.created, "owned_by": "moec",
                                            "max_model_len": api.window}]}

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest):
        api.check_model(body.model)
        given = body.prompts()
        prompts = [api.prompt_ids(prompt) for prompt in given]
        echoes = [p if isinstance(p, str) else api.codec.decode(ids) for p, ids in zip(given, prompts)] if body.echo else None
        jobs = api.jobs(body, prompts, body.max_tokens, body.logprobs, echoes)
        answer = fmt.Answer.new("text_completion", api.model_id, sum(map(len, prompts)), body.logprobs is not None)
        return await api.answer(answer, body, jobs)

    @router.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        api.check_model(body.model)
        prompt = api.chat_prompt(body.messages)
        answer = fmt.Answer.new("chat.completion", api.model_id, len(prompt))
        return await api.answer(answer, body, api.jobs(body, [prompt], body.limit()))

    @router.post("/tokenize")
    def tokenize(body: TokenizeRequest) -> dict:
        api.check_model(body.model)
        if body.messages is not None:
            tokens = api.chat_prompt(body.messages)
        else:
            try:
                tokens = api.codec.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            except ValueError as err:
                raise APIError(400, str(err), "prompt", "invalid_prompt") from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": api.window}

    @router.post("/detokenize")
    def detokenize(body: DetokenizeRequest) -> dict:
        api.check_model(body.model)
        if any(token >= api.vocab for token in body.tokens):
            raise APIError(400, f"a token id is outside the model's vocabulary (model.inputs.vocab is {api.vocab})", "tokens",
                           "invalid_token")
        return {"prompt": api.codec.decode(body.tokens)}

    @router.get("/tokenizer_info")
    def tokenizer_info() -> dict:
        return {**api.codec.special, "chat_template": api.codec.chat_template or DEFAULT_TEMPLATE, "model_max_length": api.window,
                "vocab_size": api.vocab, "tokenizer": api.codec.name}

    return router
