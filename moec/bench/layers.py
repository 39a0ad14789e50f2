"""The MoE layer candidates ``moec bench`` times, each a forward + backward step closure.

Shape legend: N tokens, D model width, H expert hidden width, E experts, k choices per token.
Every candidate takes the same input ``x`` (1, N, D), the same upstream gradient and
gradients for its input and all weights; parameter gradients are set to ``None`` before each
step, as ``optimizer.zero_grad(set_to_none=True)`` does in training.

- ``dense``: the limit. The SwiGLU GEMMs of N*k rows through one expert's weights: the same
  active FLOPs as the MoE layer, without routing.
- ``moec eager`` / ``moec compiled``: the fused ``moe`` function of a generated program (a
  one-layer spec built from the layer's own spec fields), called directly.
- ``hf grouped_mm``: HF transformers' ``MixtralSparseMoeBlock`` with
  ``experts_implementation="grouped_mm"`` (only when transformers is installed).
- ``per-expert loop``: a Python loop over experts with index_add_ combine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import moec
from moec.moe import ROUTERS


@dataclass(frozen=True)
class LayerShape:
    tokens: int
    width: int  # D
    hidden: int  # H
    experts: int  # E
    top_k: int  # k

    def active_flops(self) -> int:
        """Forward + backward FLOPs of the SwiGLU expert GEMMs: 3 GEMMs, 3x for fwd + bwd."""
        return 3 * 3 * 2 * self.tokens * self.top_k * self.width * self.hidden

    def label(self) -> str:
        return f"N={self.tokens} D={self.width} H={self.hidden} E={self.experts} top-{self.top_k}"


def layer_spec_text(shape: LayerShape, layer_yaml: str | None = None, kernel: str = "auto") -> str:
    """A spec with one MoE layer (the given layer's YAML flow mapping, or a top-k SwiGLU layer)."""
    layer = layer_yaml or (f"{{kind: moe, experts: {shape.experts}, top_k: {shape.top_k}, "
                           f"expert: {{hidden: {shape.hidden}, activation: swiglu}}}}")
    return (f"version: 1\nname: bench_layer\nmodel:\n  d_model: {shape.width}\n  max_seq_len: {max(shape.tokens, 8)}\n"
            f"  inputs: {{kind: tokens, vocab: 256}}\n  blocks:\n    - layers:\n        - {layer}\n  head: {{kind: lm}}\n"
            f"schedule: {{kernels: {{moe: {kernel}}}}}\n"
            f"train: {{seed: 0, steps: 1, batch: 1, seq_len: {max(shape.tokens, 8)}, optimizer: {{lr: 1.0e-3}}, data: {{kind: text}}}}\n")


class MoecLayer(torch.nn.Module):
    """The fused ``moe`` function of a one-layer generated program, with that layer's parameters."""

    def __init__(self, spec_text: str, device, dtype, kernel_choice=None) -> None:
        """``kernel_choice``: kernels.moe auto's measured choice (moec.bench.kernel_choice); None: the fixed rule."""
        super().__init__()
        from moec.compile import build_model, compile_spec

        spec = moec.load_spec_text(spec_text, "<bench layer>")
        model = build_model(spec, device=device, dtype=dtype, program=compile_spec(spec, kernel_choice=kernel_choice))
        self.moe = model.blocks[0].moe  # the generated MoE class: forward(h), or forward(h, token ids)
        (_, attrs), = model.program.moe_layers()
        self.routes_by_id = not ROUTERS[attrs.router.kind].learned  # token_id: the router reads token ids

    def forward(self, x: torch.Tensor):
        if self.routes_by_id:
            out, aux, *_ = self.moe(x, torch.arange(x.shape[1], device=x.device).unsqueeze(0))  # ids 0..N-1
        else:
            out, aux, *_ = self.moe(x)
        return out, aux


def dense_swiglu(shape: LayerShape, device, dtype) -> torch.nn.Module:
    module = torch.nn.Module()
    module.w_up = torch.nn.Parameter(torch.randn(shape.hidden, shape.width, device=device, dtype=dtype) * shape.width**-0.5)
    module.w_gate = torch.nn.Parameter(torch.randn(shape.hidden, shape.width, device=device, dtype=dtype) * shape.width**-0.5)
    module.w_down = torch.nn.Parameter(torch.randn(shape.width, shape.hidden, device=device, dtype=dtype) * shape.hidden**-0.5)

    def forward(x):  # (1, N, D) -> the N*k rows an MoE layer computes, through one set of weights
        rows = x.reshape(-1, shape.width).repeat(shape.top_k, 1)
        out = F.linear(F.silu(F.linear(rows, module.w_gate)) * F.linear(rows, module.w_up), module.w_down)
        return out.view(shape.top_k, -1, shape.width), None  # (k, N, D): the upstream gradient broadcasts
    module.forward = forward
    return module


class ExpertLoop(torch.nn.Module):
    """Top-k softmax router, then one Python iteration per expert over its rows."""

    def __init__(self, shape: LayerShape, device, dtype) -> None:
        super().__init__()
        D, H, E = shape.width, shape.hidden, shape.experts
        self.k = shape.top_k
        self.router = torch.nn.Parameter(torch.randn(E, D, device=device, dtype=dtype) * D**-0.5)
        self.w_gate = torch.nn.Parameter(torch.randn(E, H, D, device=device, dtype=dtype) * D**-0.5)
        self.w_up = torch.nn.Parameter(torch.randn(E, H, D, device=device, dtype=dtype) * D**-0.5)
        self.w_down = torch.nn.Parameter(torch.randn(E, D, H, device=device, dtype=dtype) * H**-0.5)

    def forward(self, x):
        x = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.softmax(F.linear(x, self.router), -1).topk(self.k, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for expert in range(self.w_up.shape[0]):
            token, choice = torch.where(chosen == expert)
            rows = x[token]
            y = F.linear(F.silu(F.linear(rows, self.w_gate[expert])) * F.linear(rows, self.w_up[expert]), self.w_down[expert])
            out = out.index_add(0, token, y * weights[token, choice, None])
        return out, None


def hf_grouped_mm(shape: LayerShape, device, dtype) -> torch.nn.Module | None:
    """HF transformers' Mixtral MoE block on its grouped_mm experts, built from a config (no download)."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    config = MixtralConfig(hidden_size=shape.width, intermediate_size=shape.hidden, num_local_experts=shape.experts,
                           num_experts_per_tok=shape.top_k, experts_implementation="grouped_mm")
    block = MixtralSparseMoeBlock(config).to(device=device, dtype=dtype)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=param.shape[-1] ** -0.5)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, x):
            return self.block(x), None
    return Wrapped()


def step_of(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, autocast: torch.dtype | None = None) -> Callable[[], None]:
    """One training step of ``module``: grads to None, forward, backward of <out, grad> + aux."""
    params = list(module.parameters())

    def step() -> None:
        for param in params:
            param.grad = None
        x.grad = None
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            out, aux = module(x)
        loss = (out.float() * grad).sum() + (aux if aux is not None else 0.0)
        loss.backward()
    return step


def candidates(shape: LayerShape, device, dtype, layer_yaml: str | None = None, kernels: tuple[str, ...] = ("auto",),
               compiled: bool = True, hf: bool = True, compiled_kernels: tuple[str, ...] = ("auto",)) -> dict[str, torch.nn.Module]:
    """The modules to time for one layer shape, by name."""
    modules: dict[str, torch.nn.Module] = {"dense (limit)": dense_swiglu(shape, device, dtype)}
    for kernel in kernels:
        layer = MoecLayer(layer_spec_text(shape, layer_yaml, kernel), device, dtype).train()
        label = "moec" if kernel == "auto" else f"moec {kernel}"
        modules[f"{label} eager"] = layer
        if compiled and kernel in compiled_kernels:
            modules[f"{label} compiled"] = torch.compile(layer, fullgraph=True)
    hf_block = hf_grouped_mm(shape, device, dtype) if hf else None
    if hf_block is not None:
        modules["hf grouped_mm"] = hf_block.train()
    modules["per-expert loop"] = ExpertLoop(shape, device, dtype)
    return modules
