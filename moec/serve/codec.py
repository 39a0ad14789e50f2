"""Prompts in, text out: the token ids of the run's data (UTF-8 bytes, a tokenizer.json, or plain ids).

Every codec has ``encode`` (text -> ids), ``decode`` (ids -> text), ``decoder()`` (an
incremental decoder: one id in, the new text out), ``token_text`` (one id as the
log-probabilities show it), and the special tokens of its tokenizer (``special``: ``bos_token``,
``eos_token``, ``pad_token``), ``stop_ids`` (the ids that end a generation) and
``chat_template`` (None: the plain default of :mod:`moec.serve.chat`).
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

REPLACEMENT = "\ufffd"


class BytesCodec:
    """``tokenizer: bytes``: one token per UTF-8 byte; output decoded incrementally (a character may span tokens).

    Ids past 255 (a vocabulary wider than the bytes) have no text: they show as U+FFFD.
    """

    name = "bytes"
    special = {"bos_token": None, "eos_token": None, "pad_token": None}
    stop_ids: frozenset[int] = frozenset()
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))  # no special tokens to add

    def decode(self, ids: list[int]) -> str:
        decode = self.decoder()
        return "".join(decode(token) for token in ids) + decode(None)

    def decoder(self):
        """One id -> its new text; ``None`` flushes a character left unfinished (U+FFFD)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda token: (decoder.decode(b"", final=True) if token is None
                              else decoder.decode(bytes([token])) if token < 256 else REPLACEMENT)

    def token_text(self, token: int) -> str:
        """An ASCII byte is its character; any other byte ``bytes:\\xNN`` (OpenAI's spelling for part of a character)."""
        return chr(token) if token < 128 else f"bytes:\\x{token:02x}" if token < 256 else REPLACEMENT


class TokenizerCodec:
    """``tokenizer: PATH/tokenizer.json`` (Hugging Face tokenizers), with the tokenizer_config.json beside it, if any."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.name, self.tokenizer = path, Tokenizer.from_file(path)
        config = read_tokenizer_config(Path(path).parent)
        self.special = {key: config.get(key) for key in ("bos_token", "eos_token", "pad_token")}
        self.chat_template = config.get("chat_template")
        eos = self.special["eos_token"]
        self.stop_ids = frozenset(config.get("eos_token_ids", [])) | frozenset(
            [self.tokenizer.token_to_id(eos)] if eos and self.tokenizer.token_to_id(eos) is not None else [])

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def decoder(self):
        """Decode the ids so far and emit the new suffix (a token's text can depend on its neighbours)."""
        ids, shown = [], [""]

        def step(token: int | None) -> str:
            """``None`` flushes; a text ending in U+FFFD waits for the rest of its character."""
            if token is not None:
                ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            if token is not None and text.endswith(REPLACEMENT):
                return ""
            new, shown[0] = text[len(shown[0]):], text
            return new

        return step

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)


class IdsCodec:
    """Data without text (token files, random tokens): prompts and output are whitespace-separated ids."""

    name = "ids"
    special = {"bos_token": None, "eos_token": None, "pad_token": None}
    stop_ids: frozenset[int] = frozenset()
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:  # no special tokens to add
            return [int(part) for part in text.split()]
        except ValueError:
            raise ValueError("this model's data has no text: give the prompt as whitespace-separated token ids") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(f"{token} " for token in ids)

    def decoder(self):
        return lambda token: "" if token is None else f"{token} "

    def token_text(self, token: int) -> str:
        return str(token)


def read_tokenizer_config(directory: Path) -> dict:
    """The special tokens and chat template of an HF tokenizer directory (tokenizer_config.json, chat_template.jinja,
    generation_config.json's eos ids); empty where the files are missing."""
    def load(name):
        path = directory / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    config, generation = load("tokenizer_config.json"), load("generation_config.json")
    found = {key: _content(config.get(key)) for key in ("bos_token", "eos_token", "pad_token")}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    eos_ids = generation.get("eos_token_id")
    eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    return found | {"chat_template": template, "eos_token_ids": eos_ids}


def _content(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with its ``content``."""
    return token.get("content") if isinstance(token, dict) else token


def codec_for(spec):
    data = spec.train.data
    tokenizer = getattr(data, "tokenizer", None)
    if data.kind in ("text", "hf_dataset"):
        return BytesCodec() if tokenizer == "bytes" else TokenizerCodec(tokenizer)
    return IdsCodec()
