"""``POST /v1/completions`` through the ``openai`` SDK: the numbers are the model's own.

Log-probabilities equal ``log_softmax`` of one direct forward over the same tokens, greedy text
equals ``moec generate --temperature 0``, choice i of a seeded request equals the generator with
seed + i, and streamed text equals the whole answer.
"""

import time

import httpx
import pytest
import torch
from typer.testing import CliRunner

from moec.cli.main import app as cli
from moec.serve.generate import Generator
from moec.serve.sampling import Sampling
from tests.serve.helpers import BYTE_MODEL, byte_ids

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def generator(trained_model):
    model, spec = trained_model
    return Generator(model, spec, compile=False)


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[S, V] log_softmax of one forward over ``ids``: row i predicts token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).output[0].float(), -1)


def test_echo_logprobs_equal_the_log_softmax_of_a_direct_forward(client, trained_model):
    model, _ = trained_model
    prompt = "def load(path):\n    "
    reply = client.completions.create(model=BYTE_MODEL, prompt=prompt, max_tokens=16, temperature=0.9, seed=5, echo=True,
                                      logprobs=3, extra_body={"top_k": 50})
    choice = reply.choices[0]
    logprobs = choice.logprobs
    ids = byte_ids(logprobs.tokens)
    assert ids[:len(prompt)] == list(prompt.encode()) and len(ids) == len(prompt) + 16
    assert choice.text == bytes(ids).decode("utf-8", errors="replace") and choice.finish_reason == "length"
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.text_offset == list(range(len(ids)))  # one byte, one character (ASCII here)
    expected = direct_logprobs(model, ids)
    served = torch.tensor(logprobs.token_logprobs[1:])
    truth = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert (served - truth).abs().max().item() < 1e-5  # prompt (prefill) and generated (decode steps) alike
    for position, top in enumerate(logprobs.top_logprobs[1:]):
        best = torch.topk(expected[position], 3)
        want = {chr(i) if i < 128 else f"bytes:\\x{i:02x}": v for i, v in zip(best.indices.tolist(), best.values.tolist())}
        assert set(want) <= set(top) and max(abs(top[k] - v) for k, v in want.items()) < 1e-5
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 16


def test_greedy_text_equals_moec_generate_for_text_ids_and_a_batch(client, trained_run):
    prompt = "import json\n"
    cli_out = CliRunner().invoke(cli, ["generate", str(trained_run[0]), "--prompt", prompt, "--max-new-tokens", "20",
                                       "--temperature", "0", "--no-compile"])
    assert cli_out.exit_code == 0, cli_out.output
    greedy = cli_out.stdout.removesuffix("\n")
    as_text = client.completions.create(model=BYTE_MODEL, prompt=prompt, max_tokens=20, temperature=0)
    as_ids = client.completions.create(model=BYTE_MODEL, prompt=list(prompt.encode()), max_tokens=20, temperature=0)
    batch = client.completions.create(model=BYTE_MODEL, prompt=[prompt, "def "], max_tokens=20, temperature=0)
    alone = client.completions.create(model=BYTE_MODEL, prompt="def ", max_tokens=20, temperature=0)
    assert as_text.choices[0].text == as_ids.choices[0].text == batch.choices[0].text == greedy
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[1].text == alone.choices[0].text
    assert batch.usage.prompt_tokens == len(prompt) + 4 and batch.usage.completion_tokens == 40


def test_n_choices_sample_with_seed_plus_i_and_stream_the_same_text(client, generator):
    body = dict(model=BYTE_MODEL, prompt="class ", max_tokens=12, temperature=1.0, top_p=0.95, seed=21, n=3)
    whole = client.completions.create(**body)
    texts = [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    sampling = Sampling(temperature=1.0, top_p=0.95)
    expected = [bytes(generator.stream(list(b"class "), 12, sampling, seed=21 + i)).decode("utf-8", errors="replace")
                for i in range(3)]
    assert texts == expected and len(set(texts)) == 3
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    assert streamed == texts
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"] * 3 and chunks[-1].usage.completion_tokens == 36 and chunks[-1].choices == []


def test_stop_strings_end_the_text_before_them_streamed_or_not(client):
    body = dict(model=BYTE_MODEL, prompt="for i in ", max_tokens=40, temperature=1.0, seed=3)
    free = client.completions.create(**body).choices[0].text
    stop = free[15:17]  # two characters from the middle: the text ends before their first occurrence
    cut = free[:free.index(stop)]
    stopped = client.completions.create(**body, stop=[stop, "\x00never"])
    assert stopped.choices[0].text == cut and stopped.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**body, stop=[stop, "\x00never"], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_zero_with_echo_scores_the_prompt_alone(client, trained_model):
    ids = list(b"while True:")
    reply = client.completions.create(model=BYTE_MODEL, prompt=[ids, ids[:4]], max_tokens=0, echo=True, logprobs=0)
    first, second = reply.choices
    assert first.text == "while True:" and second.text == "whil" and reply.usage.completion_tokens == 0
    truth = direct_logprobs(trained_model[0], ids)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert (torch.tensor(first.logprobs.token_logprobs[1:]) - truth).abs().max().item() < 1e-5
    assert second.logprobs.token_logprobs[1:] == pytest.approx(first.logprobs.token_logprobs[1:4], abs=1e-5)
    assert first.logprobs.top_logprobs[1] == {"h": first.logprobs.token_logprobs[1]}  # logprobs 0: the token's own


def test_a_client_that_goes_away_cancels_its_request(server):
    before = httpx.get(f"{server}/stats", timeout=10).json()
    body = {"model": BYTE_MODEL, "prompt": "x", "max_tokens": 63, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as reply:
        assert next(reply.iter_lines()).startswith("data: {")  # the first token's chunk; then the client hangs up
    deadline = time.time() + 10
    while (after := httpx.get(f"{server}/stats", timeout=10).json())["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert after["active"] == 0 and after["completed"] == before["completed"] + 1
    assert after["tokens"] - before["tokens"] < 63  # dropped before its last token
