"""Flat gradient buckets: one dtype per bucket, at most BUCKET_BYTES, order kept (every rank must agree)."""

import torch

from moec.backends.parallel import buckets


def test_buckets_split_by_dtype_and_size_in_order(monkeypatch):
    monkeypatch.setattr(buckets, "BUCKET_BYTES", 64)
    tensors = [torch.zeros(8), torch.zeros(4, dtype=torch.bfloat16), torch.zeros(10), torch.zeros(2), torch.zeros(3, dtype=torch.bfloat16)]
    position = {id(t): i for i, t in enumerate(tensors)}
    got = [[position[id(t)] for t in bucket] for bucket in buckets._buckets(tensors)]
    # fp32: 32 + 40 bytes > 64 starts a second bucket, which takes the next 8 bytes too; then bf16 (8 + 6 bytes)
    assert got == [[0], [2, 3], [1, 4]]


def test_a_tensor_larger_than_a_bucket_gets_its_own():
    tensors = [torch.zeros(1), torch.zeros(buckets.BUCKET_BYTES // 4 + 1), torch.zeros(1)]
    assert [len(b) for b in buckets._buckets(tensors)] == [1, 1, 1]
