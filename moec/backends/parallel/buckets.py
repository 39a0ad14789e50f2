"""Gradient reduction in a few large collectives instead of one per parameter.

``all_reduce_flat`` packs tensors of one dtype into a flat buffer (torch's own
``_flatten_dense_tensors``), all-reduces it once and copies the result back: what DDP's
buckets do, for the gradients the generated ``reduce_gradients`` reduces itself (expert
parallelism without FSDP). Every rank must pass the tensors in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket size


def all_reduce_flat(tensors: list[torch.Tensor], group: dist.ProcessGroup, op=dist.ReduceOp.SUM) -> None:
    """All-reduce ``tensors`` in place, in flat buckets of one dtype of at most BUCKET_BYTES each."""
    for bucket in _buckets(tensors):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=op, group=group)
        for tensor, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            tensor.copy_(reduced)


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    buckets: list[list[torch.Tensor]] = []
    sizes: list[int] = []
    for dtype in dict.fromkeys(t.dtype for t in tensors):  # first-seen order: the same on every rank
        buckets.append([])
        sizes.append(0)
        for tensor in (t for t in tensors if t.dtype == dtype):
            nbytes = tensor.numel() * tensor.element_size()
            if buckets[-1] and sizes[-1] + nbytes > BUCKET_BYTES:
                buckets.append([])
                sizes.append(0)
            buckets[-1].append(tensor)
            sizes[-1] += nbytes
    return [bucket for bucket in buckets if bucket]
