"""``moec data prepare``: tokenize a spec's text sources once into token files (``kind: token_files``).

The spec's ``train.data`` must be ``kind: text``: its files are split into train / validation
exactly as training splits them, each file is read in line-aligned chunks of about 4 MiB
(any size, no byte budget), encoded with ``data.tokenizer`` (``bytes``: one id per byte), and
the ids are appended to ``<out>/train.bin`` and ``<out>/val.bin`` as little-endian ``uint16``
(``uint32`` when the vocabulary needs it): the format ``kind: token_files`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moec.data.datasets import split_files

CHUNK_BYTES = 4 << 20


@dataclass
class Prepared:
    paths: dict[str, Path]
    tokens: dict[str, int]
    text_bytes: dict[str, int]
    dtype: str


def prepare_tokens(spec, out_dir: Path, progress=None) -> Prepared:
    """Write the token files; ``progress(bytes_done)`` is called as text is consumed."""
    data = spec.train.data
    if data.kind != "text":
        raise ValueError(f"moec data prepare tokenizes text sources; train.data.kind is '{data.kind}'")
    encode, vocab = _encoder(data.tokenizer)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = Prepared({}, {}, {}, dtype)
    for split, files in split_files(list(data.files), data.val_fraction).items():
        path = out_dir / f"{split}.bin"
        tokens = text_bytes = 0
        with open(path, "wb") as handle:
            for file in files:
                for chunk in _chunks(file):
                    ids = np.asarray(encode(chunk), dtype=dtype)
                    ids.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tofile(handle)
                    tokens, text_bytes = tokens + ids.size, text_bytes + len(chunk)
                    if progress:
                        progress(len(chunk))
        result.paths[split], result.tokens[split], result.text_bytes[split] = path, tokens, text_bytes
    return result


def total_bytes(spec) -> int:
    """The text's size, for a progress bar."""
    return sum(path.stat().st_size for files in split_files(list(spec.train.data.files), spec.train.data.val_fraction).values()
               for path in files)


def _encoder(tokenizer: str):
    if tokenizer == "bytes":
        return (lambda chunk: np.frombuffer(chunk, dtype=np.uint8)), 256
    from tokenizers import Tokenizer

    from moec.schema.checks import tokenizer_vocab_size

    model = Tokenizer.from_file(tokenizer)
    return (lambda chunk: model.encode(chunk.decode("utf-8", errors="replace"), add_special_tokens=False).ids), \
        tokenizer_vocab_size(tokenizer)


def _chunks(path: Path):
    """The file's bytes in pieces of about CHUNK_BYTES that end at a newline (no UTF-8 character is cut)."""
    with open(path, "rb") as handle:
        carry = b""
        while True:
            block = handle.read(CHUNK_BYTES)
            if not block:
                break
            block = carry + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:  # no newline yet: keep reading (a line longer than the chunk)
                carry = block
                continue
            carry = block[cut:]
            yield block[:cut]
        if carry:
            yield carry
