"""Prompts in, text out: the token ids of the run's data (UTF-8 bytes, a tokenizer.json, or plain ids)."""

from __future__ import annotations

import codecs


class BytesCodec:
    """``tokenizer: bytes``: one token per UTF-8 byte; output decoded incrementally (a character may span tokens)."""

    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decoder(self):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda token: decoder.decode(bytes([token]))


class TokenizerCodec:
    """``tokenizer: PATH/tokenizer.json`` (Hugging Face tokenizers)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.name, self.tokenizer = path, Tokenizer.from_file(path)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decoder(self):
        """Decode the ids so far and emit the new suffix (a token's text can depend on its neighbours)."""
        ids, shown = [], [""]

        def step(token: int) -> str:
            ids.append(token)
            text = self.tokenizer.decode(ids)
            new, shown[0] = text[len(shown[0]):], text
            return new

        return step


class IdsCodec:
    """Data without text (token files, random tokens): prompts and output are whitespace-separated ids."""

    name = "ids"

    def encode(self, text: str) -> list[int]:
        try:
            return [int(part) for part in text.split()]
        except ValueError:
            raise ValueError("this model's data has no text: give the prompt as whitespace-separated token ids") from None

    def decoder(self):
        return lambda token: f"{token} "


def codec_for(spec):
    data = spec.train.data
    tokenizer = getattr(data, "tokenizer", None)
    if data.kind in ("text", "hf_dataset"):
        return BytesCodec() if tokenizer == "bytes" else TokenizerCodec(tokenizer)
    return IdsCodec()
