"""What the engine does for the OpenAI routes: stop tokens, cancellation, and log-probabilities on both of its paths."""

import asyncio

import pytest
import torch

import moec
from moec.serve.engine import Engine
from moec.serve.generate import Generator
from moec.serve.request import DONE, Request
from moec.serve.sampling import Sampling
from tests.passes.helpers import MOE, spec_with

GREEDY = Sampling(temperature=0)


def run(engine: Engine, *requests_args) -> list[tuple[list, Request]]:
    """Submit one request per ``(prompt, max_new_tokens, options)`` together; (items, request) of each when all end."""
    async def go():
        loop = asyncio.get_running_loop()
        requests = [Request(prompt, new, GREEDY, 0, loop, **options) for prompt, new, options in requests_args]
        engine.submit(*requests)

        async def drain(request):
            items = []
            while (item := await asyncio.wait_for(request.output.get(), 60)) is not DONE:
                items.append(item)
            return items, request

        return await asyncio.gather(*(drain(r) for r in requests))

    return asyncio.run(go())


@pytest.fixture(scope="module")
def engine(trained_model):
    model, spec = trained_model
    engine = Engine(Generator(model, spec, compile=False), slots=2, queue_limit=8)
    yield engine
    engine.stop()


def test_a_stop_token_ends_the_request_unsent(engine):
    [(free, _)] = run(engine, ([105, 109, 112], 6, {}))
    tokens = [item.token for item in free]
    [(stopped, request)] = run(engine, ([105, 109, 112], 6, {"stop_tokens": frozenset([tokens[2]])}))
    assert [item.token for item in stopped] == tokens[:tokens.index(tokens[2])] and request.finish_reason == "stop"


def test_a_cancelled_request_gives_its_row_back(engine):
    async def go():
        request = Request([1, 2, 3], 4000, GREEDY, 0, asyncio.get_running_loop())
        engine.submit(request)
        first = await asyncio.wait_for(request.output.get(), 60)
        request.cancelled = True
        while await asyncio.wait_for(request.output.get(), 60) is not DONE:
            pass
        return first, request

    first, request = asyncio.run(go())
    assert first is not DONE and request.finish_reason == "cancelled" and request.generated < 64
    assert engine.rows == [None, None]


def test_log_probabilities_with_and_without_a_kv_cache_equal_a_direct_forward(engine):
    """The prompt's from a forward over the prompt, each new token's from a forward over the tokens before it: what a
    model whose Sinkhorn router balances over the whole window (no KV cache) sees when it samples."""
    sinkhorn = spec_with("        - kind: attention\n          heads: 2\n" + MOE + "          router: {kind: sinkhorn}\n",
                         name="sinkhorn")
    recompute = Engine(Generator(moec.build_model(sinkhorn).eval(), sinkhorn, compile=False), slots=4)
    prompt = [7, 40, 41, 42, 43, 44]
    try:
        for served in (engine, recompute):
            [(items, request)] = run(served, (prompt, 5, {"logprobs": 2, "echo_logprobs": True}))
            ids = prompt + [item.token for item in items]
            with torch.no_grad():
                def forward(n):  # log_softmax of the forward over the first n tokens, [n, V]
                    return torch.log_softmax(served.model(torch.tensor([ids[:n]])).output[0].float(), -1)

                rows = list(forward(len(prompt))[:-1]) + [forward(n)[-1] for n in range(len(prompt), len(ids))]
            scored = request.prompt_scores[1:] + items
            assert request.prompt_scores[0].logprob is None and len(scored) == len(rows) == len(ids) - 1
            error = max(abs(s.logprob - row[token].item()) for s, row, token in zip(scored, rows, ids[1:]))
            assert error < 1e-5, error
            assert [s.top[0][0] for s in scored] == [row.argmax().item() for row in rows]  # the most likely id there
    finally:
        recompute.stop()
    assert not recompute.generator.cached and engine.generator.cached
