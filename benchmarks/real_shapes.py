"""The peers of moec's MoE layer at real shapes (benchmarks/gpu_layers.py times them).

- ``DenseSwiGLU``: the equal-FLOP limit, three ``nn.Linear`` GEMMs over the N*k rows an MoE layer computes
  (the same module in fp8 after torchao's ``convert_to_float8_training``: fp8 vs bf16 on the same GEMMs).
- ``TorchtitanStyle``: torchtitan's MoE forward written out, because its 0.3.0 wheel cannot be carried alone (it
  imports ``spmd_types`` and its distributed package): softmax top-k router, renormalized; tokens sorted by
  expert; ``GroupedExperts._run_experts_grouped_mm`` (three ``grouped_mm`` with separate w1 / w3 / w2, bf16);
  scores applied after the experts, then a scatter-add back to the tokens. GPT-OSS: biases and the clamped SwiGLU.
- ``TorchtitanStyle(..., fp8=True)``: the same with torchtitan's fp8 MoE recipe (CUDA sm90 only): every expert's
  token group padded to a multiple of 16 (torchtitan's ``TOKEN_GROUP_ALIGN_SIZE_M``), then torchao's rowwise fp8
  grouped GEMM (``_to_fp8_rowwise_then_scaled_grouped_mm``). moec's experts do not run this yet: the row says what
  fp8 experts would give at the shape.
- ``hf_block``: HF transformers' MoE block of the family (Mixtral, Qwen3-MoE, GPT-OSS) on its grouped_mm experts.

Legend: N tokens, D model width, H expert hidden width, E experts, k choices per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moec.bench.layers import LayerShape

LIMIT, ALPHA = 7.0, 1.702  # GPT-OSS's clamped SwiGLU


@dataclass(frozen=True)
class RealShape:
    name: str
    shape: LayerShape
    family: str  # HF's: mixtral, qwen3_moe, gpt_oss
    clamped: bool = False  # GPT-OSS: clamped SwiGLU with expert and router biases

    def layer_yaml(self) -> str:
        s = self.shape
        if self.clamped:
            expert = (f"{{hidden: {s.hidden}, activation: clamped_swiglu, bias: true, swiglu_limit: {LIMIT}, "
                      f"swiglu_alpha: {ALPHA}}}")
            router = "{kind: topk, normalize: true, bias: true}"
        else:
            expert, router = f"{{hidden: {s.hidden}, activation: swiglu}}", "{kind: topk, normalize: true}"
        return f"{{kind: moe, experts: {s.experts}, top_k: {s.top_k}, expert: {expert}, router: {router}}}"


REAL = (
    RealShape("mixtral-8x7b", LayerShape(8192, 4096, 14336, 8, 2), "mixtral"),
    RealShape("qwen3-30b-a3b", LayerShape(16384, 2048, 768, 128, 8), "qwen3_moe"),
    # one expert-parallel rank of DeepSeek-V3 (256 experts over ep 8): its 32 local experts, top-8, 8192 tokens;
    # HF's block for it is Mixtral's (the routed experts' math; DeepSeek's grouped sigmoid router is not timed)
    RealShape("deepseek-v3-ep8-slice", LayerShape(8192, 7168, 2048, 32, 8), "mixtral"),
    RealShape("gpt-oss-20b", LayerShape(8192, 2880, 2880, 32, 4), "gpt_oss", clamped=True),
)
SMOKE = tuple(RealShape(r.name, LayerShape(64, 64, 32, min(r.shape.experts, 8), min(r.shape.top_k, 4)), r.family, r.clamped)
              for r in REAL)


class DenseSwiGLU(nn.Module):
    """The limit: the SwiGLU GEMMs of the N*k routed rows through one expert's weights, no routing."""

    def __init__(self, shape: LayerShape, device, dtype) -> None:
        super().__init__()
        self.k = shape.top_k
        make = lambda i, o: nn.Linear(i, o, bias=False, device=device, dtype=dtype)
        self.w_gate, self.w_up, self.w_down = make(shape.width, shape.hidden), make(shape.width, shape.hidden), make(shape.hidden, shape.width)

    def forward(self, x):  # (1, N, D) -> (k, N, D): the upstream gradient broadcasts
        rows = x.reshape(-1, x.shape[-1]).repeat(self.k, 1)
        return self.w_down(F.silu(self.w_gate(rows)) * self.w_up(rows)).view(self.k, -1, x.shape[-1]), None


class TorchtitanStyle(nn.Module):
    """torchtitan's MoE forward (router, sort by expert, GroupedExperts' three grouped GEMMs, scatter-add)."""

    def __init__(self, real: RealShape, device, dtype, fp8: bool = False) -> None:
        super().__init__()
        s, self.real, self.fp8 = real.shape, real, fp8
        param = lambda *size: nn.Parameter(torch.randn(*size, device=device, dtype=dtype) * size[-1] ** -0.5)
        self.router = param(s.experts, s.width)
        self.w1, self.w3, self.w2 = param(s.experts, s.hidden, s.width), param(s.experts, s.hidden, s.width), param(s.experts, s.width, s.hidden)
        if real.clamped:
            self.b13, self.b2 = param(s.experts, 2 * s.hidden), param(s.experts, s.width)

    def forward(self, x):
        s = self.real.shape
        tokens = x.reshape(-1, s.width)
        scores = torch.softmax(F.linear(tokens, self.router).float(), -1)
        top_scores, chosen = scores.topk(s.top_k, -1)
        top_scores = top_scores / top_scores.sum(-1, keepdim=True)
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.histc(flat.float(), bins=s.experts, min=0, max=s.experts - 1)  # torchtitan's count
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        rows = tokens[order // s.top_k]
        out = self._experts(rows, offsets, counts.long())
        out = (out.float() * top_scores.reshape(-1, 1)[order]).to(x.dtype)
        combined = torch.zeros_like(tokens).index_add_(0, order // s.top_k, out)
        return combined.view_as(x), None

    def _experts(self, rows, offsets, counts):
        """GroupedExperts._run_experts_grouped_mm: w1 / w3 / w2 as three grouped GEMMs in bf16 (or fp8)."""
        if self.fp8:
            return _fp8_experts(rows, counts, self.w1, self.w3, self.w2)
        gate = F.grouped_mm(rows.bfloat16(), self.w1.bfloat16().transpose(-2, -1), offs=offsets)
        up = F.grouped_mm(rows.bfloat16(), self.w3.bfloat16().transpose(-2, -1), offs=offsets)
        if self.real.clamped:  # GPT-OSS: biases and the clamped SwiGLU
            bias = self.b13.repeat_interleave(counts, dim=0, output_size=rows.shape[0])
            gate, up = gate + bias[:, : gate.shape[1]], up + bias[:, gate.shape[1]:]
            gate = gate.clamp(max=LIMIT)
            hidden = (up.clamp(-LIMIT, LIMIT) + 1) * gate * torch.sigmoid(ALPHA * gate)
        else:
            hidden = F.silu(gate) * up
        out = F.grouped_mm(hidden, self.w2.bfloat16().transpose(-2, -1), offs=offsets)
        return out + self.b2.repeat_interleave(counts, dim=0, output_size=rows.shape[0]) if self.real.clamped else out


def _fp8_experts(rows, counts, w1, w3, w2, align: int = 16):
    """SwiGLU experts through torchao's rowwise fp8 grouped GEMM: rows copied into groups padded to ``align`` (a
    static buffer of M + align * E rows), the three GEMMs, the real rows read back."""
    from torchao.prototype.moe_training import (
        _to_fp8_rowwise_then_scaled_grouped_mm as fp8_gmm,
    )

    experts = counts.shape[0]
    aligned = (counts + align - 1) // align * align
    padded_ends = torch.cumsum(aligned, 0)
    expert = torch.repeat_interleave(torch.arange(experts, device=rows.device), counts, output_size=rows.shape[0])
    start, padded_start = torch.cumsum(counts, 0) - counts, padded_ends - aligned
    dest = padded_start[expert] + torch.arange(rows.shape[0], device=rows.device) - start[expert]
    padded = rows.new_zeros(rows.shape[0] + align * experts, rows.shape[1]).index_copy(0, dest, rows)
    offsets = padded_ends.to(torch.int32)
    gemm = lambda a, w: fp8_gmm(a, w.transpose(-2, -1), offsets, torch.bfloat16, pad_token_groups_for_grouped_mm=False)
    hidden = F.silu(gemm(padded, w1)) * gemm(padded, w3)
    return gemm(hidden, w2)[dest]


def hf_block(real: RealShape, device, dtype) -> nn.Module | None:
    """HF's MoE block of the family on its grouped_mm experts, built from a config (no download); None without
    transformers."""
    try:
        from transformers import GptOssConfig, MixtralConfig, Qwen3MoeConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        from transformers.models.qwen3_moe.modeling_qwen3_moe import (
            Qwen3MoeSparseMoeBlock,
        )
    except ImportError:
        return None
    s = real.shape
    if real.family == "qwen3_moe":
        block = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=s.width, moe_intermediate_size=s.hidden, num_experts=s.experts,
                                                      num_experts_per_tok=s.top_k, norm_topk_prob=True,
                                                      experts_implementation="grouped_mm"))
    elif real.family == "gpt_oss":
        block = GptOssMLP(GptOssConfig(hidden_size=s.width, intermediate_size=s.hidden, num_local_experts=s.experts,
                                       num_experts_per_tok=s.top_k, experts_implementation="grouped_mm"))
    else:
        block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=s.width, intermediate_size=s.hidden, num_local_experts=s.experts,
                                                    num_experts_per_tok=s.top_k, experts_implementation="grouped_mm"))
    block = block.to(device=device, dtype=dtype)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(std=param.shape[-1] ** -0.5)
    return _FirstOutput(block)


class _FirstOutput(nn.Module):
    """(output, None) from a block that returns the output alone or (output, router scores)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        out = self.block(x)
        return (out[0] if isinstance(out, tuple) else out), None
