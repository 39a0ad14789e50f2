"""The spec of an ``attention`` layer: heads, RoPE (with YaRN), q / k norms, sinks, sliding window."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from moec.layers.fields import LayerName, no_dropout
from moec.schema.base import Base, Dim, PosFloat, PosInt, Prob, field_error


class Yarn(Base):
    """YaRN context extension of RoPE (Peng et al. 2023), as HF transformers' ``rope_type: yarn``."""

    kind: Literal["yarn"]
    factor: Annotated[float, Field(gt=1.0, le=1e6)]
    original_max_seq_len: Dim = Field(..., description="The context length the model was pretrained with.")
    beta_fast: PosFloat = 32.0
    beta_slow: PosFloat = 1.0
    truncate: bool = Field(True, description="Round the correction range to whole dimensions.")


class Rope(Base):
    """Rotary position embedding on queries and keys."""

    theta: PosFloat = 10000.0
    scaling: Yarn | None = Field(None, description="null: plain RoPE.")
    fraction: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        1.0, description="Partial rotary (HF's partial_rotary_factor; GLM-4.5: 0.5): the first head_dim x fraction dims of "
                         "each q / k head rotate (pairs i and i + rotary_dim / 2), the rest pass unchanged.")


def rotary_dim(rope: Rope, head_dim: int) -> int | None:
    """The rotated dims of each head under partial rotary (``rope.fraction`` < 1); None: the whole head."""
    return None if rope.fraction == 1.0 else round(head_dim * rope.fraction)


class QkNorm(Base):
    """RMSNorm of the queries and keys after their projections, before RoPE."""

    kind: Literal["rmsnorm"] = "rmsnorm"
    scope: Literal["head", "projection"] = Field(
        ..., description="head: one [head_dim] weight shared by the heads (Qwen3); projection: over the whole q / k projection (OLMoE)."
    )
    eps: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-6


class Attention(Base):
    """Multi-head self-attention; ``kv_heads < heads`` is grouped-query attention."""

    kind: Literal["attention"]
    name: LayerName | None = None
    heads: PosInt
    kv_heads: PosInt | None = Field(None, description="Default: heads (plain MHA).")
    head_dim: Dim | None = Field(None, description="Default: d_model // heads.")
    rope: Rope | None = Field(default_factory=Rope, description="null disables RoPE.")
    causal: bool = True
    bias: bool | Literal["qkv"] = Field(False, description="true: biases on q, k, v and the output projection; qkv: on q, k, v only (Qwen2).")
    qk_norm: QkNorm | None = None
    sinks: bool = Field(False, description="A learned logit per head joins each softmax row and takes probability mass (GPT-OSS).")
    window: Dim | None = Field(None, description="Sliding window: a query sees itself and the window - 1 keys before it. null: all.")
    dropout: Prob = Field(0.0, description="Not implemented yet: only 0 is accepted.")

    @model_validator(mode="after")
    def _window_is_causal(self) -> "Attention":
        if self.window is not None and not self.causal:
            raise field_error("window", "a sliding window is implemented for causal attention only")
        no_dropout(self.dropout)
        return self


def resolve_attention(layer: dict, d_model: int) -> None:
    """Fill the derived defaults of a dumped ``Attention`` (``moec validate --resolved``)."""
    layer["kv_heads"] = layer["kv_heads"] or layer["heads"]
    layer["head_dim"] = layer["head_dim"] or max(1, d_model // layer["heads"])
