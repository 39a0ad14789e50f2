"""Hugging Face tensor names <-> moec parameter names, and the conversion shard by shard.

HF layer ``i`` is moec block ``i``. Experts come in two layouts, both read:

- per expert (what ``save_pretrained`` writes): ``experts.<e>.{gate,up,down}_proj.weight``
  (Mixtral: ``block_sparse_moe.experts.<e>.{w1,w3,w2}.weight``), stacked into moec's
  ``experts.w_{gate,up,down}`` [E, out, in] once all E pieces have been read;
- fused (transformers v5 in memory): ``experts.gate_up_proj`` [E, 2I, H] (the first I rows
  are the gate) and ``experts.down_proj`` [E, H, I].

Export writes the per-expert layout, which every transformers version loads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import torch

from moec.interop.weights import WeightsError, index_files
from moec.ir.names import split_block_name

HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

GLOBAL = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "final_norm.weight", "lm_head.weight": "head.weight"}
# Within a decoder layer: HF suffix -> moec suffix (``ffn`` is ``moe`` or ``mlp``).
LAYER = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "{ffn}_norm.weight",
    **{f"self_attn.{p}_proj.weight": f"attention.w{p}.weight" for p in "qkvo"},
    **{f"self_attn.{p}_proj.bias": f"attention.w{p}.bias" for p in "qkvo"},
    "self_attn.q_norm.weight": "attention.q_norm.weight",
    "self_attn.k_norm.weight": "attention.k_norm.weight",
    "{moe}.gate.weight": "moe.router.weight",  # GPT-OSS: mlp.router.{weight,bias} instead (ROUTER_GPT_OSS)
    "mlp.shared_expert.gate_proj.weight": "moe.shared.w_gate",
    "mlp.shared_expert.up_proj.weight": "moe.shared.w_up",
    "mlp.shared_expert.down_proj.weight": "moe.shared.w_down",
    "mlp.shared_expert_gate.weight": "moe.shared_gate.weight",
    "self_attn.sinks": "attention.sinks",
    "mlp.gate_proj.weight": "mlp.w_gate.weight",
    "mlp.up_proj.weight": "mlp.w_up.weight",
    "mlp.down_proj.weight": "mlp.w_down.weight",
}
EXPERT_PROJ = {"mixtral": {"w1": "w_gate", "w3": "w_up", "w2": "w_down"}}
DEFAULT_EXPERT_PROJ = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}


def moe_module(family: str) -> str:
    return "block_sparse_moe" if family == "mixtral" else "mlp"


ROUTER_GPT_OSS = {"mlp.router.weight": "moe.router.weight", "mlp.router.bias": "moe.router.bias"}


def _layer_table(family: str, has_moe: bool) -> dict[str, str]:
    ffn, moe = ("moe" if has_moe else "mlp"), moe_module(family)
    table = {hf.format(moe=moe): ours.format(ffn=ffn) for hf, ours in LAYER.items()}
    if family == "gpt_oss":
        table = {hf: ours for hf, ours in table.items() if ours != "moe.router.weight"} | ROUTER_GPT_OSS
    if has_moe:  # mlp.gate.weight is the router, not a dense gate projection
        table = {hf: ours for hf, ours in table.items() if not ours.startswith("mlp.")}
    return table


class Converter:
    """HF tensors in, moec tensors out; per-expert pieces are held until a layer's stack is complete."""

    def __init__(self, family: str, moe_layers: list[bool], experts: int, tied: bool = False):
        self.family, self.moe_layers, self.experts, self.tied = family, moe_layers, experts, tied
        self.tables = {has: _layer_table(family, has) for has in (False, True)}
        if family == "mixtral":  # in transformers v5 memory: mlp, not block_sparse_moe
            self.tables[True]["mlp.gate.weight"] = "moe.router.weight"
        self.pending: dict[str, dict[int, torch.Tensor]] = {}
        proj = "|".join(EXPERT_PROJ.get(family, DEFAULT_EXPERT_PROJ))
        module = f"(?:{moe_module(family)}|mlp)"
        self.per_expert = re.compile(rf"^{module}\.experts\.(\d+)\.({proj})\.weight$")
        self.fused = re.compile(rf"^{module}\.experts\.(gate_up_proj|down_proj)$")
        self.gpt_oss = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)(_bias)?$") if family == "gpt_oss" else None

    def __call__(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if name == "lm_head.weight" and self.tied:  # some checkpoints store the tied head too: it is embed.weight
            return
        if name in GLOBAL:
            yield GLOBAL[name], tensor
            return
        found = HF_LAYER.match(name)
        if not found:
            raise KeyError(f"tensor {name!r} has no place in the moec model")
        index, rest = int(found.group(1)), found.group(2)
        prefix = f"blocks.{index}."
        table = self.tables[self.moe_layers[index]]
        if rest in table:
            yield prefix + table[rest], tensor
        elif self.gpt_oss and (m := self.gpt_oss.match(rest)):
            yield from _gpt_oss_experts(prefix + "moe.experts.", m.group(1), bool(m.group(2)), tensor)
        elif m := self.per_expert.match(rest):
            key = prefix + "moe.experts." + EXPERT_PROJ.get(self.family, DEFAULT_EXPERT_PROJ)[m.group(2)]
            pieces = self.pending.setdefault(key, {})
            pieces[int(m.group(1))] = tensor
            if len(pieces) == self.experts:
                yield key, torch.stack([pieces[e] for e in range(self.experts)])
                del self.pending[key]
        elif m := self.fused.match(rest):
            if m.group(1) == "down_proj":
                yield prefix + "moe.experts.w_down", tensor
            else:
                gate, up = tensor.chunk(2, dim=1)  # [E, 2I, H]: gate rows first
                yield prefix + "moe.experts.w_gate", gate.contiguous()
                yield prefix + "moe.experts.w_up", up.contiguous()
        else:
            raise KeyError(f"tensor {name!r} has no place in the moec model")

    def finish(self) -> None:
        if self.pending:
            missing = {key: sorted(set(range(self.experts)) - set(pieces)) for key, pieces in self.pending.items()}
            raise KeyError(f"experts missing from the checkpoint: {missing}")


def _gpt_oss_experts(prefix: str, which: str, bias: bool, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """GPT-OSS: ``gate_up_proj`` [E, H, 2I] with gate and up interleaved (even, odd columns), ``down_proj`` [E, I, H]."""
    if which == "down_proj":
        yield prefix + ("b_down" if bias else "w_down"), tensor if bias else tensor.transpose(1, 2).contiguous()
        return
    gate, up = tensor[..., ::2], tensor[..., 1::2]
    if bias:
        yield prefix + "b_gate", gate.contiguous()
        yield prefix + "b_up", up.contiguous()
    else:
        yield prefix + "w_gate", gate.transpose(1, 2).contiguous()
        yield prefix + "w_up", up.transpose(1, 2).contiguous()


def _gpt_oss_to_hf(prefix: str, state: dict, index: int) -> Iterator[tuple[str, torch.Tensor]]:
    ours = f"blocks.{index}.moe.experts."
    for bias, suffix in ((False, ""), (True, "_bias")):
        gate, up = state[ours + ("b_gate" if bias else "w_gate")], state[ours + ("b_up" if bias else "w_up")]
        if not bias:
            gate, up = gate.transpose(1, 2), up.transpose(1, 2)
        yield f"{prefix}mlp.experts.gate_up_proj{suffix}", torch.stack([gate, up], dim=-1).flatten(-2).contiguous()
    yield f"{prefix}mlp.experts.down_proj", state[ours + "w_down"].transpose(1, 2).contiguous()
    yield f"{prefix}mlp.experts.down_proj_bias", state[ours + "b_down"]


def to_hf(family: str, moe_layers: list[bool], state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """moec state -> HF tensors (per-expert layout), one at a time."""
    inverse = {has: {ours: hf for hf, ours in _layer_table(family, has).items()} for has in (False, True)}
    glob = {ours: hf for hf, ours in GLOBAL.items()}
    proj = {ours: hf for hf, ours in EXPERT_PROJ.get(family, DEFAULT_EXPERT_PROJ).items()}
    for name, tensor in state.items():
        if name in glob:
            yield glob[name], tensor
            continue
        found = split_block_name(name)
        if found is None:
            raise KeyError(f"parameter {name!r} has no Hugging Face name")
        index, rest = found
        prefix = f"model.layers.{index}."
        if rest.startswith("moe.experts.") and family == "gpt_oss":
            if rest == "moe.experts.w_up":  # one interleaved tensor from four of ours: emitted once per layer
                yield from _gpt_oss_to_hf(prefix, state, index)
        elif rest.startswith("moe.experts."):
            which = proj[rest.removeprefix("moe.experts.")]
            for e in range(tensor.shape[0]):
                yield f"{prefix}{moe_module(family)}.experts.{e}.{which}.weight", tensor[e]
        elif rest in inverse[moe_layers[index]]:
            yield prefix + inverse[moe_layers[index]][rest], tensor
        else:
            raise KeyError(f"parameter {name!r} has no Hugging Face name")


def hf_shapes(family: str, moe_layers: list[bool], model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> the shape a moec model (built from the config, say on the meta device) needs, per-expert layout."""
    return {name: tuple(tensor.shape) for name, tensor in to_hf(family, moe_layers, model.state_dict())}


PICKLED = ("pytorch_model*.bin", "*.pt", "*.pth")  # torch.save files: unpickling them can run any code


def source_files(directory: Path) -> list[Path]:
    """The safetensors files of an HF directory (sharded via model.safetensors.index.json or one file).

    Pickled weights without safetensors beside them are refused, never loaded.
    """
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return [directory / f for f in index_files(index)]
    files = sorted(directory.glob("*.safetensors"))
    pickled = sorted({p.name for pattern in PICKLED for p in directory.glob(pattern)})
    if pickled and not files:
        raise WeightsError(f"{directory / pickled[0]}: pickled weights are not read (unpickling can run code); convert them to "
                           "safetensors first, e.g. with transformers: AutoModelForCausalLM.from_pretrained(DIR)"
                           ".save_pretrained(OUT, safe_serialization=True)")
    return files
