"""The ``attention`` layer kind: multi-head / grouped-query self-attention."""

from moec.layers.attention.cost import attention_flops, attention_params
from moec.layers.attention.lower import lower_attention
from moec.layers.attention.spec import Attention, resolve_attention
from moec.layers.kind import LayerKind, TpWeights

# The k / v projections: kept whole on every tensor-parallel rank when there are fewer KV heads than ranks.
KV_PROJECTIONS = TpWeights(("wk", "wv"), linear=True)

KIND = LayerKind(
    spec=Attention,
    resolve=resolve_attention,
    lower=lower_attention,
    params=attention_params,
    flops={"attention": attention_flops},
    tp_groups={
        "attention.qkv": TpWeights(("wq", "wk", "wv"), linear=True, split="column"),
        "attention.out": TpWeights(("wo",), linear=True, split="row"),
    },
)

__all__ = ["KIND", "KV_PROJECTIONS", "Attention"]
