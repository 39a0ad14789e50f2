"""``moec serve``: a real uvicorn on 127.0.0.1 (an ephemeral port) and httpx clients."""

import asyncio
import json
import time

import httpx
import pytest
from typer.testing import CliRunner

import moec
from moec.cli.main import app as cli
from moec.serve.engine import Engine
from moec.serve.generate import Generator
from tests.serve.helpers import running_server


def test_health(server):
    reply = httpx.get(f"{server}/health", timeout=10)
    assert reply.status_code == 200 and reply.json() == {"status": "ok", "model": "quick", "step": 8, "kv_cache": True}


def test_a_streamed_generation_equals_moec_generate(server, trained_run):
    body = {"prompt": "def load(", "max_new_tokens": 20, "temperature": 0.9, "top_k": 50, "seed": 7, "stream": True}
    with httpx.stream("POST", f"{server}/generate", json=body, timeout=30) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line.removeprefix("data: ")) for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == {"done": True, "tokens": 20, "finish_reason": "length"}
    streamed = "".join(event["text"] for event in events[:-1])
    cli_out = CliRunner().invoke(cli, ["generate", str(trained_run[0]), "--prompt", "def load(", "--max-new-tokens", "20",
                                       "--temperature", "0.9", "--top-k", "50", "--seed", "7", "--no-compile"])
    assert cli_out.exit_code == 0 and cli_out.stdout == streamed + "\n"


def test_sixteen_concurrent_clients_are_all_served_in_batched_steps(server):
    async def client(i):
        async with httpx.AsyncClient(timeout=60) as http:
            return await http.post(f"{server}/generate", json={"prompt": f"x = {i}", "max_new_tokens": 12, "seed": i})

    async def everyone():
        return await asyncio.gather(*(client(i) for i in range(16)))

    started = time.time()
    replies = asyncio.run(everyone())
    assert time.time() - started < 60
    assert [r.status_code for r in replies] == [200] * 16
    assert all(len(r.json()["tokens"]) == 12 for r in replies)
    stats = httpx.get(f"{server}/stats", timeout=10).json()
    assert stats["max_batch"] > 1 and stats["queue_depth"] == 0 and stats["tokens_per_s"] > 0


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": ""}, 422, "at least 1 character"),
    ({"prompt": "x", "max_new_tokens": -1}, 422, "greater than or equal to 1"),
    ({"prompt": "x", "max_new_tokens": 10**9}, 422, "less than or equal to 4096"),
    ({"prompt": "x", "colour": "red"}, 422, "Extra inputs are not permitted"),
    ({"prompt": "x" * 65}, 400, "the prompt has 65 tokens; the model's window (model.max_seq_len) is 64"),
])
def test_malformed_requests(server, body, status, message):
    reply = httpx.post(f"{server}/generate", json=body, timeout=10)
    assert reply.status_code == status and message in reply.text


def test_prefix_cache_hits_are_counted(server):
    before = httpx.get(f"{server}/stats", timeout=10).json()["prefix_cache"]
    for prompt in ("import os\nimport sys\n", "import os\nimport sys\nimport json\n"):
        assert httpx.post(f"{server}/generate", json={"prompt": prompt, "max_new_tokens": 2}, timeout=30).status_code == 200
    after = httpx.get(f"{server}/stats", timeout=10).json()["prefix_cache"]
    assert after["hits"] == before["hits"] + 1 and after["hit_tokens"] == before["hit_tokens"] + len("import os\nimport sys\n")


def test_a_full_queue_answers_503(trained_run):
    with running_server(trained_run[0], slots=1, queue_limit=1) as url:
        async def everyone():
            async with httpx.AsyncClient(timeout=60) as http:
                return await asyncio.gather(*(http.post(f"{url}/generate", json={"prompt": "a", "max_new_tokens": 60})
                                              for _ in range(6)))

        codes = [reply.status_code for reply in asyncio.run(everyone())]
        assert codes.count(503) >= 1 and codes.count(200) >= 2 and codes.count(200) + codes.count(503) == 6
        stats = httpx.get(f"{url}/stats", timeout=10).json()
        assert stats["rejected"] == codes.count(503)


def test_the_openai_routes_answer_a_full_queue_with_503_in_their_shape(trained_model):
    """An engine whose thread is stopped never drains its queue: one waiting request fills a queue of one."""
    from fastapi.testclient import TestClient

    from moec.serve.codec import BytesCodec
    from moec.serve.request import Request
    from moec.serve.sampling import Sampling
    from moec.serve.server import create_app

    model, spec = trained_model
    engine = Engine(Generator(model, spec, compile=False), slots=1, queue_limit=1)
    engine.stop()
    engine.submit(Request([1], 1, Sampling(), 0, asyncio.new_event_loop()))
    client = TestClient(create_app(engine, BytesCodec(), spec))
    full = client.post("/v1/completions", json={"model": "quick", "prompt": "a"})
    assert full.status_code == 503 and full.json() == {"error": {
        "message": "the queue is full (1 waiting requests); retry later", "type": "server_error", "param": None,
        "code": "queue_full"}}
    assert client.post("/generate", json={"prompt": "a"}).status_code == 503
    group = client.post("/v1/chat/completions", json={"model": "quick", "messages": [{"role": "user", "content": "a"}], "n": 2})
    assert group.status_code == 400 and group.json()["error"]["message"] == (
        "this request needs 2 generations (prompts x n); the server queues at most 1 (--queue)")
    assert engine.stats()["rejected"] == 2


def test_a_model_without_a_decode_path_is_served_one_request_at_a_time():
    from moec.serve.request import DONE, Request
    from moec.serve.sampling import Sampling
    from tests.passes.helpers import MOE, spec_with

    spec = spec_with("        - kind: attention\n          heads: 2\n" + MOE + "          router: {kind: sinkhorn}\n", name="sinkhorn")
    model = moec.build_model(spec)
    generator = Generator(model, spec, compile=False)
    engine = Engine(generator, slots=4)

    async def one():
        request = Request([1, 2, 3], 3, Sampling(temperature=0), 0, asyncio.get_running_loop())
        engine.submit(request)
        tokens = []
        while (item := await request.output.get()) is not DONE:
            tokens.append(item.token)
        return tokens

    try:
        tokens = asyncio.run(one())
    finally:
        engine.stop()
    assert engine.slots == 1 and not generator.cached
    assert tokens == list(generator.stream([1, 2, 3], 3, Sampling(temperature=0)))


def test_serve_without_a_run_is_one_line(tmp_path):
    out = CliRunner().invoke(cli, ["serve", str(tmp_path / "nope")])
    assert out.exit_code == 1 and out.stderr.strip() == f"error: {tmp_path / 'nope'}: no such run or checkpoint directory"
    spec = tmp_path / "tiny.yaml"
    spec.write_text(open("specs/token_routed_tiny.yaml").read())
    out = CliRunner().invoke(cli, ["serve", str(spec)])
    assert out.exit_code == 1 and out.stderr.strip() == f"error: {spec}: no weights beside the spec ({tmp_path / 'tiny.safetensors'})"
