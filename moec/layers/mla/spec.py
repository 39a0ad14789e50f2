"""The spec of an ``mla`` layer: multi-head latent attention (DeepSeek-V2 / V3, HF's ``DeepseekV3Attention``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from moec.layers.attention.spec import Yarn
from moec.layers.fields import LayerName
from moec.schema.base import Base, Dim, PosFloat, PosInt, field_error


class MlaYarn(Yarn):
    """YaRN as DeepSeek configures it (HF ``rope_parameters`` with ``mscale`` / ``mscale_all_dim``)."""

    mscale: PosFloat | None = Field(
        None, description="With mscale_all_dim: cos / sin are scaled by m(mscale) / m(mscale_all_dim), m(s) = 0.1 * s * ln(factor) + 1; "
                          "otherwise by 0.1 * ln(factor) + 1.")
    mscale_all_dim: PosFloat | None = Field(None, description="The softmax scale is multiplied by m(mscale_all_dim)^2 (DeepSeek's mscale).")


class MlaRope(Base):
    """Rotary embedding of the decoupled rope part of the queries and of the one key shared by the heads."""

    theta: PosFloat = 10000.0
    interleave: bool = Field(True, description="HF's rope_interleave: dims (2i, 2i+1) pair up (DeepSeek); false: i and i + d/2.")
    scaling: MlaYarn | None = Field(None, description="null: plain RoPE.")


class Mla(Base):
    """Multi-head latent attention: keys and values come from one compressed latent per token (``kv_lora_rank``)
    plus a rope key shared by the heads (``qk_rope_head_dim``), which is all a decode cache holds.

    q = wq(x), or wq_b(q_norm(wq_a(x))) with ``q_lora_rank`` > 0; [kv, k_pe] = wkv_a(x); [k_nope, v] = wkv_b(kv_norm(kv));
    each head's query is [q_nope, rope(q_pe)], its key [k_nope, rope(k_pe)]. docs/semantics.md defines it.
    """

    kind: Literal["mla"]
    name: LayerName | None = None
    heads: PosInt
    q_lora_rank: Annotated[int, Field(ge=0, le=1 << 20)] | None = Field(
        None, description="Rank of the query's low-rank projection; 0 or null: one plain q projection (wq).")
    kv_lora_rank: Dim = Field(..., description="Width of the compressed key-value latent (what the cache holds, with the rope key).")
    qk_nope_head_dim: Dim = Field(..., description="Per head: query / key dims without position.")
    qk_rope_head_dim: Dim = Field(..., description="Per head: query dims with RoPE; the one rope key is shared by the heads.")
    v_head_dim: Dim = Field(..., description="Per head: value dims.")
    norm_eps: Annotated[float, Field(gt=0.0, le=1.0)] = Field(1e-6, description="eps of the q and kv latent RMSNorms (HF: 1e-6).")
    bias: bool = Field(False, description="HF's attention_bias: biases on wq_a (or none on wq), wkv_a and wo.")
    rope: MlaRope = Field(default_factory=MlaRope)

    @model_validator(mode="after")
    def _even_rope(self) -> "Mla":
        if self.qk_rope_head_dim % 2:
            raise field_error("qk_rope_head_dim", f"must be even for RoPE, got {self.qk_rope_head_dim}")
        return self


def resolve_mla(layer: dict, d_model: int) -> None:
    """Fill the derived defaults of a dumped ``Mla`` (``moec validate --resolved``): a null q_lora_rank is 0."""
    layer["q_lora_rank"] = layer["q_lora_rank"] or 0
