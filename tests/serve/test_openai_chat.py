"""``POST /v1/chat/completions`` through the ``openai`` SDK: the plain default template of a byte model, and a model
imported from Hugging Face with ``moec import hf``, whose tokenizer and chat template render as transformers renders them."""

import json

import httpx
import pytest
import torch

from moec.serve.chat import render_chat
from moec.serve.generate import Generator
from moec.serve.load import load_served
from moec.serve.sampling import Sampling
from tests.serve.helpers import BYTE_MODEL, running_server

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "import json?"}]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chat_text(client, model: str, **body) -> tuple[str, str, object]:
    """(whole text, streamed text, the whole reply) of one chat request."""
    whole = client.chat.completions.create(model=model, messages=MESSAGES, **body)
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **body))
    assert chunks[0].choices[0].delta.role == "assistant"
    return whole.choices[0].message.content, "".join(c.choices[0].delta.content or "" for c in chunks), whole


def test_a_byte_model_chats_with_the_plain_default_template(server, trained_model):
    model, spec = trained_model
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    whole, streamed, reply = chat_text(client, BYTE_MODEL, max_tokens=10, temperature=0)
    prompt = "system: You are terse.\nuser: import json?\nassistant:"
    expected = bytes(Generator(model, spec, compile=False).stream(list(prompt.encode()), 10, Sampling(temperature=0)))
    assert whole == streamed == expected.decode("utf-8", errors="replace")
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 10
    assert reply.choices[0].finish_reason == "length" and reply.object == "chat.completion"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny random Mixtral saved by transformers with a byte-level BPE tokenizer and a ChatML template, imported."""
    T = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moec.interop import import_hf

    root = tmp_path_factory.mktemp("hf_chat")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.train_from_iterator(["import json\ndef load(path):\n    return json.loads(path)\n" * 20], trainer)
    torch.manual_seed(0)
    config = T.MixtralConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=64,
                             num_local_experts=4)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    tokenizer.save(str(root / "hf" / "tokenizer.json"))
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "chat_template": CHATML}))
    import_hf(root / "hf", root / "mix.yaml")
    return root


def test_an_imported_model_chats_with_its_tokenizers_template(imported):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(imported / "hf")
    rendered = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    model, spec, codec = load_served(imported / "mix.yaml")
    assert render_chat(MESSAGES, codec.chat_template, codec.special) == rendered  # jinja2 as transformers renders it
    ids = hf.encode(rendered, add_special_tokens=False)
    tokens = list(Generator(model, spec, compile=False).stream(ids, 12, Sampling(temperature=0)))
    eos = hf.convert_tokens_to_ids("<|im_end|>")
    expected = tokens[:tokens.index(eos)] if eos in tokens else tokens
    with running_server(imported / "mix.yaml", slots=2) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["mix"]
        whole, streamed, reply = chat_text(client, "mix", max_tokens=12, temperature=0)
        assert whole == streamed == hf.decode(expected)
        assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(expected)
        assert reply.choices[0].finish_reason == ("stop" if eos in tokens else "length")
        info = httpx.get(f"{url}/tokenizer_info", timeout=10).json()  # what lm-eval's remote tokenizer reads
        assert info["chat_template"] == CHATML and info["eos_token"] == "<|im_end|>"
