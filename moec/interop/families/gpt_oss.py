"""GPT-OSS (``GptOssForCausalLM``): attention sinks and biases, full and sliding-window layers,
YaRN RoPE, clamped-SwiGLU experts with biases, a router with a bias.

Its experts are stored fused and interleaved (``InterleavedLayout``: gate and up alternate along the
last dim, where moec's ``w_gate_up`` holds the gate half, then the up half); its router takes the
softmax of the top-k logits, which is the renormalised top-k of the full softmax.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

from moec.interop.errors import NotExportable
from moec.interop.families.base import COMMON_READS, MOE_READS, ROUTER, Family, need
from moec.interop.families.experts import ExpertLookup, Piece

YARN_KEYS = {"rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate"}


class InterleavedLayout:
    """``mlp.experts.gate_up_proj`` [E, H, 2I] with gate and up interleaved (even, odd columns),
    ``down_proj`` [E, I, H], and their ``_bias`` tensors: read and written."""

    pattern = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)(_bias)?$")

    def to_moec(self, rest: str, tensor: torch.Tensor) -> list[Piece]:
        m = self.pattern.match(rest)
        if not m:
            return []
        bias = bool(m.group(2))
        if m.group(1) == "down_proj":
            return [("b_down", None, tensor)] if bias else [("w_down", None, tensor.transpose(1, 2).contiguous())]
        gate, up = tensor[..., ::2], tensor[..., 1::2]  # de-interleaved into moec's [gate; up] halves
        if bias:
            return [("b_gate_up", None, torch.stack([gate, up], dim=1))]  # [E, 2, I]
        return [("w_gate_up", None, torch.stack([gate.transpose(1, 2), up.transpose(1, 2)], dim=1))]  # [E, 2, I, H]

    def to_hf(self, prefix: str, name: str, experts: ExpertLookup) -> Iterator[tuple[str, torch.Tensor]]:
        """Four HF tensors from four of ours: all written when ``w_gate_up`` comes, nothing for the others."""
        if name != "w_gate_up":
            return
        for bias, suffix in ((False, ""), (True, "_bias")):
            fused = experts("b_gate_up" if bias else "w_gate_up")
            gate, up = fused[:, 0], fused[:, 1]
            if not bias:
                gate, up = gate.transpose(1, 2), up.transpose(1, 2)
            yield f"{prefix}mlp.experts.gate_up_proj{suffix}", torch.stack([gate, up], dim=-1).flatten(-2).contiguous()
        yield f"{prefix}mlp.experts.down_proj", experts("w_down").transpose(1, 2).contiguous()
        yield f"{prefix}mlp.experts.down_proj_bias", experts("b_down")


class GptOss(Family):
    name, architecture = "gpt_oss", "GptOssForCausalLM"
    reads = frozenset(COMMON_READS + MOE_READS + ["attention_bias", "layer_types", "sliding_window", "swiglu_limit", "swiglu_alpha",
                                                  "experts_per_token", "initial_context_length"])
    moe, expert_count_key, expert_layout = True, "num_local_experts", InterleavedLayout()
    attention_bias, windows_and_yarn, dense_layers = True, True, False  # every GPT-OSS layer is MoE
    expert_activation, expert_and_router_bias = "clamped_swiglu", True

    def check_config(self, config: dict) -> None:
        need(config, "layer_types", lambda v: set(v) <= {"full_attention", "sliding_attention"},
             "layers are full or sliding attention")
        need(config, "experts_per_token", lambda v: v == config.get("num_experts_per_tok"), "it must equal num_experts_per_tok")
        need(config, "attention_bias", lambda v: v is True, "GPT-OSS attention has biases")
        for key in ("rope_parameters", "rope_scaling"):
            need(config, key, lambda v: v is None or v.get("rope_type") in ("default", "yarn") and set(v) <= YARN_KEYS,
                 f"only plain RoPE or YaRN with the keys {sorted(YARN_KEYS)} is implemented")

    def attention_fields(self, config: dict) -> dict:
        return super().attention_fields(config) | {"sinks": True}

    def expert_fields(self, config: dict) -> dict:
        return super().expert_fields(config) | {"activation": "clamped_swiglu", "bias": True,
                                                "swiglu_limit": float(config.get("swiglu_limit", 7.0)),
                                                "swiglu_alpha": float(config.get("swiglu_alpha", 1.702))}

    def router_fields(self, config: dict) -> dict:
        return {"kind": "topk", "normalize": True, "bias": True}

    def attention_names(self) -> dict[str, str]:
        return {"sinks": "sinks"}

    def moe_names(self) -> dict[str, str]:
        return {"mlp.router.weight": ROUTER + "weight", "mlp.router.bias": ROUTER + "bias"}

    def claims(self, attention, moe) -> bool:
        """Attention with sinks."""
        return attention.sinks

    def check_moe(self, ffn, path, refuse) -> None:
        if not ffn.router.normalize:
            refuse(f"{path}.router.normalize", "GPT-OSS takes the softmax of the top-k logits (normalize: true)")

    def config_fields(self, decoder) -> dict:
        attentions = [attention for _, _, (attention, _) in decoder.layers]
        windows = {attention.window for attention in attentions} - {None}
        if len(windows) > 1:
            raise NotExportable("model.blocks: GPT-OSS has one sliding_window for every sliding layer")
        return super().config_fields(decoder) | {
            "layer_types": ["sliding_attention" if attention.window else "full_attention" for attention in attentions],
            "sliding_window": windows.pop() if windows else None}

    def moe_config_fields(self, moe, decoder) -> dict:
        return {"swiglu_limit": moe.expert.swiglu_limit, "swiglu_alpha": moe.expert.swiglu_alpha}


FAMILY = GptOss()
