"""Context parallelism (``sharding.sequence``): each rank of the cp group holds part of every sequence.

The sequence is cut into 2 x cp equal chunks; rank r holds chunks r and 2cp-1-r (the load-balanced
causal split of torchtitan and Megatron-Core: under a causal mask the early chunk has little to
attend to and the late one much, so every rank does the same work). Everything per token (norms,
MLPs, MoE layers, the head, the loss) runs on the rank's own positions; RoPE rotates at the global
positions; attention gathers the keys and values of the whole sequence from the cp group with an
autograd-aware all-gather (its backward reduce-scatters the gradients back to their owners) and
masks by global position. torch's own ``context_parallel`` (torch.distributed.tensor.experimental)
is not used: it hooks the CUDA SDPA kernels (flash / efficient / cuDNN) and has no CPU path under
gloo.

A spectral MoE layer's rfft over the sequence becomes a distributed transform (``to_channels``,
``to_bins`` and back): an all-to-all from the sequence split to a channel split (every rank the
whole sequence, in global order, for D/cp channels), the local rfft, an all-to-all to a bin split
(every rank F_r of the F = S/2+1 bins with all channels), the routed experts on those bins, and
the inverse path. F = cp*S/(2cp) + 1 never divides evenly: the bins are split unevenly, the first
F mod cp ranks holding one more (``torch.tensor_split``'s rule), so no padding is routed. The
all-to-alls are torch's autograd-aware ``all_to_all_single_autograd`` (the backward is the reverse
exchange). Copied into a build's ``model_support.py`` when the spec splits the sequence.
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

    def last_position(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D): the sequence's last position on every rank (head.pool 'last'). It is the last of cp rank 0's
        (chunk 2cp-1); the all-gather's backward sums every rank's gradient into it, and the gradients are averaged
        over cp, so each rank's identical loss counts once."""
        every = funcol.all_gather_single_autograd(x[None, :, -1].contiguous(), 0, self.group)  # (cp, B, D)
        return every[0, :, None]

    def chunked_causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of this rank's chunks r and 2cp-1-r (q: B, H, S/cp, hd) over the gathered keys and
        values (B, H, S, hd, in rank order): each chunk attends to the chunks before it whole and to itself
        causally, without a mask (``PrefixCausalAttention``)."""
        chunk = q.shape[2] // 2
        ordered = [self._chunk(t, chunk) for t in (k, v)]  # 2cp chunks of keys / values in global order
        outs = []
        for local, index in ((0, self.rank), (1, 2 * self.size - 1 - self.rank)):
            q_chunk = q[:, :, local * chunk:(local + 1) * chunk]
            k_own, v_own = ordered[0][index], ordered[1][index]
            if index == 0:  # the sequence's first chunk sees only itself
                outs.append(F.scaled_dot_product_attention(q_chunk, k_own, v_own, is_causal=True))
                continue
            k_before, v_before = (torch.cat(chunks[:index], dim=2) for chunks in ordered)
            outs.append(PrefixCausalAttention.apply(q_chunk.contiguous(), k_before, v_before, k_own.contiguous(), v_own.contiguous()))
        return torch.cat(outs, dim=2)

    def _chunk(self, x: torch.Tensor, chunk: int) -> list[torch.Tensor]:
        """(B, H, S, hd) in rank order (rank r's chunks r, 2cp-1-r) -> the 2cp chunks in global order."""
        parts = x.split(chunk, dim=2)  # rank 0's two chunks, rank 1's, ...
        return [parts[2 * c] for c in range(self.size)] + [parts[2 * r + 1] for r in reversed(range(self.size))]

    # --- the spectral MoE's distributed rfft ---------------------------------------------------------

    def bin_sizes(self, seq: int) -> list[int]:
        """How many of the S/2+1 rfft bins of a sequence of ``seq`` each rank holds: the first F mod cp one more."""
        bins = seq // 2 + 1
        return [bins // self.size + (rank < bins % self.size) for rank in range(self.size)]

    def bins(self, seq: int) -> slice:
        """The global rfft bins this rank holds (contiguous, in rank order)."""
        sizes = self.bin_sizes(seq)
        first = sum(sizes[:self.rank])
        return slice(first, first + sizes[self.rank])

    def bin_share(self, seq: int) -> float:
        """cp x this rank's fraction of the bins: a per-token mean times it, averaged over the cp ranks (as the
        gradients are), is the mean over every bin."""
        return self.size * self.bin_sizes(seq)[self.rank] / (seq // 2 + 1)

    def to_channels(self, x: torch.Tensor) -> torch.Tensor:
        """All-to-all: this rank's positions of every channel (B, S/cp, D) -> the whole sequence in global order
        for this rank's D/cp channels (B, S, D/cp)."""
        batch, seq, width = x.shape
        parts = x.view(batch, seq, self.size, width // self.size).permute(2, 0, 1, 3)  # (cp, B, S/cp, D/cp): one per rank
        got = funcol.all_to_all_single_autograd(parts.contiguous(), None, None, self.group)  # (cp, B, S/cp, D/cp): one from each rank
        chunks = got.view(self.size, batch, 2, seq // 2, -1)  # rank r's chunks r and 2cp-1-r
        ordered = torch.cat([chunks[:, :, 0], chunks[:, :, 1].flip(0)])  # (2cp, B, S/2cp, D/cp): chunks 0 .. 2cp-1
        return ordered.permute(1, 0, 2, 3).reshape(batch, 2 * self.size * (seq // 2), -1)

    def from_channels(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_channels``: (B, S, D/cp) -> (B, S/cp, D), this rank's positions again."""
        batch, seq, part = x.shape
        chunks = x.view(batch, 2 * self.size, seq // (2 * self.size), part).transpose(0, 1)  # (2cp, B, S/2cp, D/cp)
        mine = torch.stack([chunks[:self.size], chunks[self.size:].flip(0)], dim=2)  # (cp, B, 2, S/2cp, D/cp): rank r's
        got = funcol.all_to_all_single_autograd(mine.contiguous(), None, None, self.group)  # (cp, B, 2, S/2cp, D/cp)
        return got.view(self.size, batch, seq // self.size, part).permute(1, 2, 0, 3).reshape(batch, seq // self.size, -1)

    def to_bins(self, z: torch.Tensor, seq: int) -> torch.Tensor:
        """All-to-all: every bin of this rank's channels (B, F, 2D/cp), real parts then imaginary -> this rank's bins
        of every channel (B, F_r, 2D), all real parts (in channel order) then all imaginary parts."""
        batch, _, part = z.shape
        sizes = self.bin_sizes(seq)
        mine = sizes[self.rank]
        got = funcol.all_to_all_single_autograd(z.transpose(0, 1).contiguous(), [mine] * self.size, sizes, self.group)
        got = got.view(self.size, mine, batch, 2, part // 2)  # (cp, F_r, B, re / im, D/cp): one from each rank
        return got.permute(2, 1, 3, 0, 4).reshape(batch, mine, -1)

    def from_bins(self, z: torch.Tensor, seq: int) -> torch.Tensor:
        """The inverse of ``to_bins``: (B, F_r, 2D) -> (B, F, 2D/cp)."""
        batch, mine, width = z.shape
        parts = z.view(batch, mine, 2, self.size, width // (2 * self.size)).permute(3, 1, 0, 2, 4)  # (cp, F_r, B, 2, D/cp)
        got = funcol.all_to_all_single_autograd(parts.reshape(self.size * mine, batch, -1).contiguous(),
                                                self.bin_sizes(seq), [mine] * self.size, self.group)  # (F, B, 2D/cp)
        return got.transpose(0, 1)


def context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int, head_dim: int, causal: bool,
                      window: int | None, shards: SequenceShards) -> torch.Tensor:
    """Attention of this rank's queries (B, S/cp, H*hd) over the keys and values of the whole sequence, gathered from
    the cp group; key j is visible to query i when pos(j) <= pos(i) (causal) and pos(i) - pos(j) < window."""
    batch, seq, _ = q.shape
    tokens = q
    k, v = shards.gather(k), shards.gather(v)  # (B, S, KV*hd)
    q = q.view(batch, seq, heads, head_dim).transpose(1, 2)
    k = k.view(batch, -1, kv_heads, head_dim).transpose(1, 2)
    v = v.view(batch, -1, kv_heads, head_dim).transpose(1, 2)
    if causal and window is None and q.device.type == "cpu":  # no mask: each chunk's flash attention, merged
        out = shards.chunked_causal(q, k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1))
    elif not causal and window is None:  # every key visible: the gathered order does not matter
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=heads != kv_heads)
    else:  # masked by global position: an (S/cp, S) mask
        query_pos, key_pos = shards.positions(tokens)[0], shards.all_positions(tokens)  # (S/cp,), (S,)
        visible = torch.ones(seq, key_pos.shape[0], dtype=torch.bool, device=q.device)
        if causal:
            visible = visible & (key_pos[None, :] <= query_pos[:, None])
        if window is not None:
            visible = visible & (key_pos[None, :] > query_pos[:, None] - window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=heads != kv_heads)
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


class PrefixCausalAttention(torch.autograd.Function):
    """Queries of one chunk over every earlier position (all visible) and their own chunk (causal): two flash
    attentions, merged by their log-sum-exps, so no (queries x keys) mask or score matrix is ever held. The
    backward runs each part's flash backward with the merged output and log-sum-exp (ring attention's rule:
    the softmax over all keys restricted to each part). CPU flash kernels (``aten._scaled_dot_product_flash_attention_for_cpu``)."""

    @staticmethod
    def forward(ctx, q, k_before, v_before, k_own, v_own):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out_before, lse_before = flash(q, k_before, v_before, 0.0, False)
        out_own, lse_own = flash(q, k_own, v_own, 0.0, True)
        lse = torch.logaddexp(lse_before, lse_own)
        out = (out_before * (lse_before - lse).exp().unsqueeze(-1).to(q.dtype)
               + out_own * (lse_own - lse).exp().unsqueeze(-1).to(q.dtype))
        ctx.save_for_backward(q, k_before, v_before, k_own, v_own, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k_before, v_before, k_own, v_own, out, lse = ctx.saved_tensors
        flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad = grad.contiguous()
        dq_before, dk_before, dv_before = flash_backward(grad, q, k_before, v_before, out, lse, 0.0, False)
        dq_own, dk_own, dv_own = flash_backward(grad, q, k_own, v_own, out, lse, 0.0, True)
        return dq_before + dq_own, dk_before, dv_before, dk_own, dv_own
