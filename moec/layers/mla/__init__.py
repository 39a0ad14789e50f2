"""The ``mla`` layer kind: multi-head latent attention (DeepSeek-V2 / V3) with a latent decode cache."""

from moec.layers.kind import LayerKind, TpWeights
from moec.layers.mla.cost import mla_flops, mla_params
from moec.layers.mla.lower import lower_mla
from moec.layers.mla.spec import Mla, resolve_mla

# Tensor parallelism splits the heads, as torchtitan's deepseek_v3 does: the per-head projections (wq, or wq_b
# after the q latent; wkv_b) by columns, wo by rows. The latent projections and norms (wq_a, q_norm, wkv_a,
# kv_norm) stay whole on every rank. The groups are attention's: one switch splits both kinds' heads.
KIND = LayerKind(
    spec=Mla,
    resolve=resolve_mla,
    lower=lower_mla,
    params=mla_params,
    flops={"mla_attention": mla_flops},
    tp_groups={
        "attention.qkv": TpWeights(("wq", "wq_b", "wkv_b"), linear=True, split="column"),
        "attention.out": TpWeights(("wo",), linear=True, split="row"),
    },
)

__all__ = ["KIND", "Mla"]
