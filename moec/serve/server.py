"""``moec serve``: the FastAPI app over :class:`moec.serve.engine.Engine` (the optional ``[serve]`` extra).

``POST /generate`` takes a JSON :class:`GenerateRequest` (unknown fields, an empty prompt or
an out-of-range number: 422 with pydantic's message) and answers with the whole text, or
with server-sent events (``stream: true``): one ``data: {"text": ..., "token": ...}`` per
token, then ``data: {"done": true, ...}``. A prompt longer than the model's window is a 400,
a full queue a 503. ``GET /health`` and ``GET /stats`` (requests, tokens/s, prefix-cache hits,
queue depth) answer at once. The OpenAI-compatible routes (``/v1/completions``,
``/v1/chat/completions``, ``/v1/models``, ``/tokenize``, ...) are in :mod:`moec.serve.openai_api`.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from moec.serve.engine import Engine
from moec.serve.openai_api import OpenAI, openai_router
from moec.serve.openai_errors import install_error_handlers
from moec.serve.request import DONE, QueueFull, Request
from moec.serve.sampling import Sampling

MAX_NEW_TOKENS = 4096


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="Text to continue (token ids for models without text data).")
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0: greedy.")
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0)
    stream: bool = False


def create_app(engine: Engine, codec, spec, checkpoint=None) -> FastAPI:
    app = FastAPI(title=f"moec serve {spec.name}")
    install_error_handlers(app)
    app.include_router(openai_router(OpenAI(engine, codec, spec.name, spec.model.inputs.vocab, int(engine.started))))

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": spec.name, "step": getattr(checkpoint, "step", None), "kv_cache": engine.generator.cached}

    @app.get("/stats")
    def stats() -> dict:
        return engine.stats()

    @app.post("/generate")
    async def generate(body: GenerateRequest):
        try:
            ids = codec.encode(body.prompt)
            engine.generator.check_prompt(ids)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        sampling = Sampling(body.temperature, body.top_k, body.top_p)
        request = Request(ids, body.max_new_tokens, sampling, body.seed, asyncio.get_running_loop())
        try:
            engine.submit(request)
        except QueueFull as err:
            raise HTTPException(503, str(err)) from None
        decode = codec.decoder()
        if body.stream:
            return StreamingResponse(_events(request, decode), media_type="text/event-stream")
        tokens, text = [], []
        while (item := await request.output.get()) is not DONE:
            tokens.append(item.token)
            text.append(decode(item.token))
        if request.error:
            raise HTTPException(500, f"generation failed: {request.error}")
        return {"text": "".join(text), "tokens": tokens, "finish_reason": request.finish_reason}

    return app


async def _events(request: Request, decode):
    count = 0
    while (item := await request.output.get()) is not DONE:
        count += 1
        yield f"data: {json.dumps({'text': decode(item.token), 'token': item.token})}\n\n"
    last = {"done": True, "tokens": count, "finish_reason": request.finish_reason} | ({"error": request.error} if request.error else {})
    yield f"data: {json.dumps(last)}\n\n"
