"""The ``model`` section: inputs, blocks of layers, head.

A layer's fields are its kind's spec model (``moec/layers/<kind>/spec.py``); the union of them
is derived from the registry ``moec.layers.LAYER_KINDS``.

Fields left ``null`` are derived when the spec is resolved (``moec validate --resolved``
prints them filled in); their descriptions say from what.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from moec.layers import LAYER_KINDS
from moec.layers.moe.spec import Router
from moec.schema.base import MAX_DIM, Base, Dim, PosFloat, PosInt, field_error


class Norm(Base):
    """A normalisation layer."""

    kind: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    eps: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-5


# The union of the layer kinds of moec.layers, in registry order; a layer's `kind` picks its model.
Layer = Annotated[Union[tuple(kind.spec for kind in LAYER_KINDS.values())], Field(discriminator="kind")]


class Block(Base):
    """A residual block: each layer is wrapped as x + layer(norm(x)) (pre_norm) or norm(x + layer(x)); a dynamics layer
    is not wrapped (x, v = dynamics(x, v))."""

    repeat: PosInt = 1
    norm: Norm = Field(default_factory=Norm)
    residual: Literal["pre_norm", "post_norm"] = "pre_norm"
    layers: Annotated[list[Layer], Field(min_length=1, max_length=64)]

    @model_validator(mode="after")
    def _unique_layer_names(self) -> "Block":
        seen: set[str] = set()
        for index, layer in enumerate(self.layers):
            name = layer.name or layer.kind
            if name in seen:
                raise field_error(f"layers.{index}.name", f"two layers in this block are named '{name}'; give one a distinct 'name'")
            seen.add(name)
        return self


class TokenInputs(Base):
    """Integer token ids in [0, vocab)."""

    kind: Literal["tokens"]
    vocab: Dim
    pad_id: Annotated[int, Field(ge=0, le=MAX_DIM)] | None = Field(
        None, description="Padding token: its embedding row gets no gradient (torch's padding_idx)."
    )

    @model_validator(mode="after")
    def _pad_in_vocab(self) -> "TokenInputs":
        if self.pad_id is not None and self.pad_id >= self.vocab:
            raise field_error("pad_id", f"must be < vocab ({self.vocab}), got {self.pad_id}")
        return self


class ContinuousInputs(Base):
    """Real-valued vectors of ``dims`` channels per position."""

    kind: Literal["continuous"]
    dims: Annotated[int, Field(ge=1, le=4096)]


Inputs = Annotated[Union[TokenInputs, ContinuousInputs], Field(discriminator="kind")]


class Mtp(Base):
    """DeepSeek-V3's multi-token prediction (training only): ``depth`` extra modules, module k predicting token
    i+k+1 from position i; each is RMSNorm(previous hidden) ++ RMSNorm(embed(token i+k)) -> [2d -> d] projection ->
    one block shaped like the model's last block -> RMSNorm -> the shared head."""

    depth: Annotated[int, Field(ge=1, le=16, description="D: the number of MTP modules (DeepSeek-V3: 1).")]
    weight: PosFloat = Field(description="lambda: the MTP loss is weight x the mean over depths of their cross-entropies "
                                         "(DeepSeek-V3: 0.3, then 0.1).")


class LmHead(Base):
    """Logits over the vocabulary; trained with cross-entropy on the next token."""

    kind: Literal["lm"]
    tie_embeddings: bool = False
    pool: Literal["none", "last"] = Field("none", description="last: predict only from the final position.")
    mtp: Mtp | None = Field(None, description="Multi-token prediction modules trained alongside the head; none by default.")

    @model_validator(mode="after")
    def _mtp_predicts_every_position(self) -> "LmHead":
        if self.mtp is not None and self.pool == "last":
            raise field_error("mtp", "predicts a token from every position; it cannot be used with pool 'last'")
        return self


class RegressionHead(Base):
    """A linear read-out; trained with MSE on the next value."""

    kind: Literal["regression"]
    out_dims: Annotated[int, Field(ge=1, le=4096)] | None = Field(None, description="Default: inputs.dims.")
    pool: Literal["none", "last"] = Field("none", description="last: predict only from the final position.")


Head = Annotated[Union[LmHead, RegressionHead], Field(discriminator="kind")]


class Init(Base):
    """Deterministic initialisation from the train seed."""

    std: PosFloat = 0.02
    scale_by_depth: bool = Field(True, description="Output projections use std / sqrt(2 * layers).")


class Model(Base):
    """The network: inputs -> blocks -> final norm -> head."""

    d_model: Annotated[int, Field(ge=1, le=MAX_DIM)]
    max_seq_len: Dim
    inputs: Inputs
    position: Literal["none", "learned"] = Field("none", description="learned: a position embedding of max_seq_len rows.")
    blocks: Annotated[list[Block], Field(min_length=1, max_length=256)]
    final_norm: Norm | None = Field(default_factory=Norm)
    head: Head
    init: Init = Field(default_factory=Init)

    @model_validator(mode="after")
    def _head_matches_inputs(self) -> "Model":
        if self.head.kind == "lm" and self.inputs.kind != "tokens":
            raise field_error("head.kind", "an 'lm' head needs token inputs; use kind 'regression' for continuous inputs")
        if self.head.kind == "regression" and self.inputs.kind != "continuous":
            raise field_error("head.kind", "a 'regression' head needs continuous inputs; use kind 'lm' for token inputs")
        for b, i, layer in self.layers():
            where = f"blocks.{b}.layers.{i}"
            if layer.kind == "moe" and layer.router.kind == "token_id":
                self._token_ids_fit(layer.router, where)
            if layer.kind != "attention":
                continue
            if layer.head_dim is None and self.d_model % layer.heads:
                raise field_error(f"{where}.heads", f"must divide d_model ({self.d_model}), got {layer.heads}; or set head_dim")
            if layer.kv_heads is not None and layer.heads % layer.kv_heads:
                raise field_error(f"{where}.kv_heads", f"must divide heads ({layer.heads}), got {layer.kv_heads}")
            if layer.rope is not None and layer.rope.fraction < 1.0:
                self._rotary_dims_fit(layer, where)
        if self.head.kind == "lm" and self.head.mtp is not None:
            self._mtp_block_fits()
        return self

    def _rotary_dims_fit(self, layer, where: str) -> None:
        """Partial rotary rotates a whole, even number of each head's dims (HF: int(head_dim * partial_rotary_factor))."""
        head_dim = layer.head_dim or self.d_model // layer.heads
        dims = head_dim * layer.rope.fraction
        if abs(dims - round(dims)) > 1e-9 or round(dims) % 2 or round(dims) < 2:
            raise field_error(f"{where}.rope.fraction", f"rotates head_dim ({head_dim}) x {layer.rope.fraction} = {dims:g} dims of "
                                                        "each head, which must be an even whole number of at least 2")

    def _mtp_block_fits(self) -> None:
        """An MTP module's block copies the last block: a decoder layer (attention / mla, mlp / moe), as DeepSeek-V3's."""
        last = len(self.blocks) - 1
        for i, layer in enumerate(self.blocks[-1].layers):
            if layer.kind in ("dynamics", "spectral_moe"):
                raise field_error("head.mtp", f"copies the last block (blocks.{last}) into each MTP module, whose layer {i} is "
                                              f"{layer.kind!r}; multi-token prediction supports attention, mla, mlp and moe layers")
            if layer.kind == "moe" and layer.router.kind == "token_id":
                raise field_error("head.mtp", f"copies the last block (blocks.{last}) into each MTP module, whose layer {i} routes "
                                              "by token id; multi-token prediction supports the learned routers")
            if layer.kind == "moe" and layer.aux.load_balance_scope == "model" and layer.aux.load_balance > 0:
                raise field_error("head.mtp", f"copies the last block (blocks.{last}) into each MTP module, whose layer {i} pools "
                                              "its load balance over the model (load_balance_scope 'model'); use 'layer' or 'sequence'")

    def _token_ids_fit(self, router: Router, where: str) -> None:
        if self.inputs.kind != "tokens":
            raise field_error(f"{where}.router.kind", "'token_id' routes by token id and needs token inputs, but inputs are continuous")
        if router.table is not None and len(router.table) > self.inputs.vocab:
            raise field_error(f"{where}.router.table", f"has {len(router.table)} entries, more than the vocabulary ({self.inputs.vocab})")

    def layers(self):
        """``(block_index, layer_index, layer)`` for every layer as written (before ``repeat``)."""
        for b, block in enumerate(self.blocks):
            for i, layer in enumerate(block.layers):
                yield b, i, layer

    @property
    def num_layers(self) -> int:
        """Blocks after ``repeat`` is unrolled."""
        return sum(block.repeat for block in self.blocks)
