"""The layer kinds a spec's ``kind:`` names, one folder each, and the registry that lists them.

A kind's folder holds its spec model (``spec.py``), lowering (``lower.py``), parameter count and
FLOPs (``cost.py``) and, in its ``KIND``, its tensor-parallel groups. The compiler finds them here:
the schema's layer union (``moec.schema.model``), ``moec.passes.lower``, ``moec.passes.flops``,
``moec.schema.checks.estimate_params``, ``moec.passes.sharding`` and the ``TpGroup`` literal
(``moec.schema.parallel``). Adding a kind: a folder, a line below, tests (docs/adding-a-layer-kind.md).
"""

from moec.layers import attention, dynamics, mla, mlp, moe, spectral_moe
from moec.layers.kind import LayerKind, Lowering, TpWeights

# In this order in the schema's union (and so in its JSON Schema).
LAYER_KINDS: dict[str, LayerKind] = {kind.name: kind for kind in (attention.KIND, mlp.KIND, moe.KIND, spectral_moe.KIND, dynamics.KIND,
                                                                   mla.KIND)}

# Groups of the model itself, not of a layer: the vocabulary split of the embedding and the head.
MODEL_TP_GROUPS = {"embed": TpWeights(("embed.weight",), root=True), "head": TpWeights(("head.weight",), root=True)}


def tp_groups() -> dict[str, list[TpWeights]]:
    """Every tensor-parallel group -> its weights, layer kinds first (registry order), then the model's."""
    groups: dict[str, list[TpWeights]] = {}
    for kind in LAYER_KINDS.values():
        for name, weights in kind.tp_groups.items():
            if weights not in groups.setdefault(name, []):
                groups[name].append(weights)
    for name, weights in MODEL_TP_GROUPS.items():
        groups.setdefault(name, []).append(weights)
    return groups


TP_GROUPS = tp_groups()


def default_split(split: str) -> list[str]:
    """The groups tensor parallelism splits by ``split`` ("column" / "row") when the spec does not list them."""
    return [name for name, weights in TP_GROUPS.items() if any(w.split == split for w in weights)]

__all__ = ["LAYER_KINDS", "MODEL_TP_GROUPS", "TP_GROUPS", "LayerKind", "Lowering", "TpWeights", "default_split", "tp_groups"]
