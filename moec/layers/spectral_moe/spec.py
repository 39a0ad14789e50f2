"""The spec of a ``spectral_moe`` layer: an MoE over the rfft bins of the sequence."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from moec.layers.fields import LayerName
from moec.layers.moe.spec import MoeConfig, resolve_moe_config
from moec.schema.base import Base, PosInt, field_error


class SpectralMoe(Base):
    """rfft over the sequence -> (MoE on spectral tokens) x depth, shared weights -> irfft."""

    kind: Literal["spectral_moe"]
    name: LayerName | None = None
    depth: Annotated[int, Field(ge=1, le=64)] = 1
    fft_norm: Literal["ortho", "forward", "backward"] = "ortho"
    band: Literal["embedding", "index_feature", "none"] = Field(
        "embedding", description="What the router sees of a token's frequency band besides its content."
    )
    moe: MoeConfig
    residual: bool = Field(True, description="true: z = z + moe(z) at each step; false: z = moe(z), as the Tessera seed writes "
                           "`z = mixture(z)`.")
    bands: PosInt | None = Field(None, description="Per-band experts: the F rfft bins in this many contiguous groups (bin f in group "
                                 "floor(f * bands / F)), each routed only among its own experts / bands experts (router kind topk; "
                                 "experts divisible by bands, top_k <= experts / bands). null: every bin may use every expert.")

    @model_validator(mode="after")
    def _routes_by_content(self) -> "SpectralMoe":
        if self.moe.router.kind == "token_id":
            raise field_error("moe.router.kind", "'token_id' routes token ids; a spectral token is a frequency bin, not a token")
        if self.bands is not None:
            if self.moe.experts % self.bands:
                raise field_error("bands", f"must divide moe.experts ({self.moe.experts}), got {self.bands}")
            if self.moe.top_k > self.moe.experts // self.bands:
                raise field_error("bands", f"leaves {self.moe.experts // self.bands} experts per band, fewer than top_k ({self.moe.top_k})")
            if self.moe.router.kind != "topk":
                raise field_error("bands", f"restricts a softmax top-k router; router kind '{self.moe.router.kind}' is not supported with it")
            if self.moe.router.groups > 1:
                raise field_error("moe.router.groups", "limits each token to groups of experts, as bands does by frequency; use one of them")
        return self


def resolve_spectral_moe(layer: dict, d_model: int) -> None:
    """Spectral experts see the real view of complex tokens: 2 * d_model channels."""
    resolve_moe_config(layer["moe"], 2 * d_model)
