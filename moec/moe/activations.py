"""The activation registry: one entry per ``activation`` a spec may name.

An entry says which ``torch.nn.functional`` function it applies and whether it is gated
(``fn(gate(x)) * up(x)``, with a second input projection). Lowering, both backends and the
parameter declarations read this table; the schema's ``Activation`` literal lists the same
names (a test keeps them equal).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ActivationKind:
    name: str
    fn: str  # the torch.nn.functional function (F.gelu, ...)
    gated: bool  # fn(x @ w_gate.T) * (x @ w_up.T) instead of fn(x @ w_up.T)
    clamped: bool = False  # GPT-OSS: (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=l) (op clamped_glu)


ACTIVATIONS = {
    kind.name: kind
    for kind in (
        ActivationKind("gelu", fn="gelu", gated=False),
        ActivationKind("relu", fn="relu", gated=False),
        ActivationKind("silu", fn="silu", gated=False),
        ActivationKind("swiglu", fn="silu", gated=True),  # Shazeer 2020
        ActivationKind("geglu", fn="gelu", gated=True),
        ActivationKind("reglu", fn="relu", gated=True),
        ActivationKind("clamped_swiglu", fn="sigmoid", gated=True, clamped=True),  # GPT-OSS; limit and alpha from the spec
    )
}

# The expert activation of HF Mixtral-style layers (what moec bench compares against HF and a loop).
MIXTRAL_ACTIVATION = "swiglu"


# Codes of the Triton GEMM epilogue (moec.backends.triton.kernels: _activate, _clamped_glu): the function it applies.
EPILOGUE_SILU, EPILOGUE_GELU, EPILOGUE_RELU, EPILOGUE_CLAMPED = 0, 1, 2, 3
_EPILOGUE_OF_FN = {"silu": EPILOGUE_SILU, "gelu": EPILOGUE_GELU, "relu": EPILOGUE_RELU}


def triton_epilogue(activation: str) -> int:
    """The Triton epilogue code of an activation: its ``fn``'s, or the clamped GLU's."""
    kind = ACTIVATIONS[activation]
    return EPILOGUE_CLAMPED if kind.clamped else _EPILOGUE_OF_FN[kind.fn]


def is_gated(activation: str) -> bool:
    return ACTIVATIONS[activation].gated
