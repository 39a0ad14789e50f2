"""The spec's ``train.data`` kind -> its dataset (moec.data.datasets, hf_dataset, token_files)."""

from __future__ import annotations

from moec.data.datasets import Dataset, RandomTokens, Signals, TextBytes, Trajectories
from moec.data.hf_dataset import HfDatasetText
from moec.data.token_files import TokenFiles


def make_dataset(spec) -> Dataset:
    """The dataset of the spec's ``train.data``."""
    data, train, model = spec.train.data, spec.train, spec.model
    pool_last = model.head.pool == "last"
    if data.kind == "text":
        return TextBytes.from_files(train.seed, train.seq_len, pool_last, list(data.files), data.val_fraction, data.tokenizer)
    if data.kind == "hf_dataset":
        return HfDatasetText(train.seed, train.seq_len, pool_last, data)
    if data.kind == "token_files":
        return TokenFiles(train.seed, train.seq_len, pool_last, list(data.train), list(data.val), data.dtype, model.inputs.vocab)
    if data.kind == "random_tokens":
        return RandomTokens(train.seed, train.seq_len, pool_last, model.inputs.vocab)
    if data.kind == "signals":
        return Signals(train.seed, train.seq_len, pool_last, list(data.patterns), data.noise)
    return Trajectories(train.seed, train.seq_len, pool_last, list(data.patterns), data.noise)
