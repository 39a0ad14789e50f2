"""DeepSeek-V3's multi-token prediction layers in a Hugging Face checkpoint <-> moec's ``head.mtp`` modules.

DeepSeek-V3's checkpoints store MTP depth k (k = 0 .. D-1, D = ``num_nextn_predict_layers``) as one more decoder
layer after the model's N = ``num_hidden_layers``: ``model.layers.{N + k}`` holds a decoder layer under the usual
names (attention, MoE, ``input_layernorm``, ``post_attention_layernorm``), its ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm``, and copies of the model's ``embed_tokens`` and ``lm_head`` (``embed_tokens``,
``shared_head.head``). HF's ``DeepseekV3ForCausalLM`` builds none of it (it ignores the keys when loading).

moec's module k is ``mtp.{k}``: ``enorm``, ``hnorm``, ``eh_proj``, ``norm`` and ``block`` (the decoder layer); it
shares the model's embedding and head, so the import checks the copies equal them and the export writes them back.
"""

from __future__ import annotations

import re

from moec.interop.weights import WeightsError

OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
       "shared_head.norm.weight": "norm.weight"}
COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}  # of the model's tensors
MTP_NAME = re.compile(r"^mtp\.(\d+)\.(.+)$")
HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# HF configs carry no MTP loss weight: DeepSeek-V3's lambda for its first 10T of 14.8T tokens
IMPORTED_WEIGHT = 0.3


def checkpoint_depth(config: dict, names, family) -> int:
    """How many MTP layers the checkpoint holds (0: none, whatever ``num_nextn_predict_layers`` says). Layers past
    ``num_hidden_layers`` must be exactly the family's D MTP layers, else the checkpoint is refused."""
    layers = config["num_hidden_layers"]
    extra = sorted({int(found.group(1)) for name in names if (found := HF_LAYER.match(name)) and int(found.group(1)) >= layers})
    if not extra:
        return 0
    depth = (config.get("num_nextn_predict_layers") or config.get("num_mtp_layers") or 0) if family.mtp_layers else 0
    if extra != list(range(layers, layers + depth)):
        what = (f"{family.architecture} has no multi-token prediction layers moec maps" if not family.mtp_layers
                else f"num_nextn_predict_layers {depth} means layers {list(range(layers, layers + depth))}")
        raise WeightsError(f"the checkpoint holds layers {extra} past num_hidden_layers ({layers}); {what}")
    return depth


def check_copies(copies: dict, originals: dict, tied: bool) -> None:
    """Each MTP layer's ``embed_tokens`` / ``shared_head.head`` (hf name -> (moec name, tensor)) equals the model's."""
    for name, (ours, copy) in copies.items():
        target = "embed.weight" if tied else ours
        if target not in originals or not _equal(copy, originals[target]):
            raise WeightsError(f"tensor {name} differs from the model's {target} (or the model has none): moec's "
                               "multi-token prediction modules share the model's embedding and head")


def _equal(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all())


def to_hf_names(depth: int, layers: int, rest: str) -> str | None:
    """moec's ``mtp.{depth}.<rest>`` (not the block) -> its HF name, or None."""
    inverse = {ours: hf for hf, ours in OWN.items()}
    return f"model.layers.{layers + depth}.{inverse[rest]}" if rest in inverse else None


def copies_to_hf(depths: set[int], layers: int, state: dict):
    """The copies DeepSeek-V3's checkpoints hold in each MTP layer: the model's embedding and head (cloned: safetensors
    refuses two names over one storage)."""
    for depth in sorted(depths):
        for hf, ours in COPIES.items():
            yield f"model.layers.{layers + depth}.{hf}", (state[ours] if ours in state else state["embed.weight"]).clone()
