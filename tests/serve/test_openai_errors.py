"""Bad input to the OpenAI routes: OpenAI's error shape with the server's status codes, never a 500, and the server
keeps serving."""

import httpx
import pytest

from tests.serve.helpers import BYTE_MODEL

openai = pytest.importorskip("openai")

COMPLETION = {"model": BYTE_MODEL, "prompt": "x"}
CHAT = {"model": BYTE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
WINDOW = "the prompt has 65 tokens; the model's window (model.max_seq_len) is 64"

CASES = [  # (route, body, status, param, message)
    ("/v1/completions", COMPLETION | {"colour": "red"}, 422, "colour", "colour: Extra inputs are not permitted"),
    ("/v1/completions", COMPLETION | {"presence_penalty": 1}, 422, "presence_penalty", "Extra inputs are not permitted"),
    ("/v1/completions", COMPLETION | {"max_tokens": -1}, 422, "max_tokens", "max_tokens: Input should be greater than or equal to 0"),
    ("/v1/completions", COMPLETION | {"max_tokens": 10**9}, 422, "max_tokens", "less than or equal to 4096"),
    ("/v1/completions", COMPLETION | {"max_tokens": 0}, 422, None, "max_tokens 0 returns nothing without echo: true"),
    ("/v1/completions", COMPLETION | {"logprobs": 21}, 422, "logprobs", "logprobs: Input should be less than or equal to 20"),
    ("/v1/completions", COMPLETION | {"prompt": ""}, 422, "prompt", "prompt: the prompt is empty"),
    ("/v1/completions", COMPLETION | {"prompt": []}, 422, "prompt", "prompt: the prompt is empty"),
    ("/v1/completions", COMPLETION | {"prompt": [[1, 2], []]}, 422, "prompt", "prompt: the prompt is empty"),
    ("/v1/completions", COMPLETION | {"prompt": [1, -2]}, 422, "prompt", "greater than or equal to 0"),
    ("/v1/completions", COMPLETION | {"prompt": "x" * 65}, 400, "prompt", WINDOW),
    ("/v1/completions", COMPLETION | {"prompt": [[1], [7] * 65]}, 400, "prompt", WINDOW),
    ("/v1/completions", COMPLETION | {"prompt": [1, 256]}, 400, "prompt",
     "token id 256 is outside the model's vocabulary (model.inputs.vocab is 256)"),
    ("/v1/completions", COMPLETION | {"n": 17}, 422, "n", "n: Input should be less than or equal to 16"),
    ("/v1/completions", COMPLETION | {"temperature": 3}, 422, "temperature", "less than or equal to 2"),
    ("/v1/completions", COMPLETION | {"model": "gpt-4"}, 404, "model", "the model 'gpt-4' does not exist; this server serves 'quick'"),
    ("/v1/completions", {"prompt": "x"}, 422, "model", "model: Field required"),
    ("/v1/chat/completions", CHAT | {"messages": []}, 422, "messages", "messages: List should have at least 1 item"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "wizard", "content": "x"}]}, 422, "messages", "messages.0.role"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "user"}]}, 422, "messages", "messages.0.content: Field required"),
    ("/v1/chat/completions", CHAT | {"messages": "hi"}, 422, "messages", "Input should be a valid list"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": "x" * 70}]}, 400, "messages",
     "the prompt has 87 tokens; the model's window (model.max_seq_len) is 64"),
    ("/v1/chat/completions", CHAT | {"max_tokens": 4, "max_completion_tokens": 4}, 422, None,
     "give max_tokens or max_completion_tokens, not both"),
    ("/tokenize", {}, 422, None, "give exactly one of prompt and messages"),
    ("/detokenize", {"tokens": [65, 999]}, 400, "tokens", "a token id is outside the model's vocabulary"),
    ("/v1/embeddings", {"input": "x"}, 404, None, "Not Found"),
]


@pytest.mark.parametrize("route, body, status, param, message", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_input_is_an_openai_error(server, route, body, status, param, message):
    reply = httpx.post(f"{server}{route}", json=body, timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and message in error["message"]
    assert error["param"] == param
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_malformed_json_and_an_oversized_body(server):
    reply = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=10)
    assert reply.status_code == 422 and "JSON decode error" in reply.json()["error"]["message"]
    huge = b'{"model": "quick", "prompt": "' + b"x" * (9 << 20) + b'"}'
    reply = httpx.post(f"{server}/v1/completions", content=huge, headers={"content-type": "application/json"}, timeout=30)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "body_too_large"


def test_the_sdk_raises_its_own_errors_and_the_server_keeps_serving(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=BYTE_MODEL, prompt="x" * 65)
    assert caught.value.status_code == 400 and caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT["messages"])
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=BYTE_MODEL, prompt="x", logprobs=21)
    reply = client.completions.create(model=BYTE_MODEL, prompt="ok", max_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    stats = httpx.get(f"{server}/stats", timeout=10).json()
    assert stats["queue_depth"] == 0 and stats["active"] == 0
