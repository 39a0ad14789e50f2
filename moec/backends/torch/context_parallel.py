"""Context parallelism (``sharding.sequence``): each rank of the cp group holds part of every sequence.

The sequence is cut into 2 x cp equal chunks; rank r holds chunks r and 2cp-1-r (the load-balanced
causal split of torchtitan and Megatron-Core: under a causal mask the early chunk has little to
attend to and the late one much, so every rank does the same work). Everything per token (norms,
MLPs, MoE layers, the head, the loss) runs on the rank's own positions; RoPE rotates at the global
positions; attention gathers the keys and values of the whole sequence from the cp group with an
autograd-aware all-gather (its backward reduce-scatters the gradients back to their owners) and
masks by global position. torch's own ``context_parallel`` (torch.distributed.tensor.experimental)
is not used: it hooks the CUDA SDPA kernels (flash / efficient / cuDNN) and has no CPU path under
gloo. Copied into a build's ``model_support.py`` when the spec splits the sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F


def load_balanced_positions(seq: int, rank: int, size: int, device: torch.device | None = None) -> torch.Tensor:
    """The global positions a rank of ``size`` holds when each holds ``seq`` of them: chunks rank and 2*size-1-rank."""
    chunk = seq // 2
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk, device=device)
    return torch.cat([first, second])


class SequenceShards:
    """A context-parallel group: this rank's global positions and the all-gather of the whole sequence."""

    def __init__(self, group: dist.ProcessGroup):
        self.group, self.rank, self.size = group, dist.get_rank(group), dist.get_world_size(group)

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        """(1, S / cp) global positions of this rank's part of x (B, S / cp, ...)."""
        return load_balanced_positions(x.shape[1], self.rank, self.size, x.device)[None]

    def all_positions(self, x: torch.Tensor) -> torch.Tensor:
        """(S,) global positions of the gathered sequence: rank 0's part, then rank 1's, ..."""
        return torch.cat([load_balanced_positions(x.shape[1], r, self.size, x.device) for r in range(self.size)])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S / cp, ...) of every rank along the sequence, in rank order: (B, S, ...); backward sums the gradients."""
        return funcol.all_gather_tensor_autograd(x.contiguous(), gather_dim=1, group=self.group)


def context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int, head_dim: int, causal: bool,
                      window: int | None, shards: SequenceShards) -> torch.Tensor:
    """Attention of this rank's queries (B, S/cp, H*hd) over the keys and values of the whole sequence, gathered from
    the cp group; key j is visible to query i when pos(j) <= pos(i) (causal) and pos(i) - pos(j) < window."""
    batch, seq, _ = q.shape
    query_pos, key_pos = shards.positions(q)[0], shards.all_positions(q)  # (S/cp,), (S,)
    k, v = shards.gather(k), shards.gather(v)  # (B, S, KV*hd)
    q = q.view(batch, seq, heads, head_dim).transpose(1, 2)
    k = k.view(batch, -1, kv_heads, head_dim).transpose(1, 2)
    v = v.view(batch, -1, kv_heads, head_dim).transpose(1, 2)
    visible = torch.ones(seq, key_pos.shape[0], dtype=torch.bool, device=q.device)
    if causal:
        visible = visible & (key_pos[None, :] <= query_pos[:, None])
    if window is not None:
        visible = visible & (key_pos[None, :] > query_pos[:, None] - window)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=heads != kv_heads)
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)
