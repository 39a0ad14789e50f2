"""Reference kernels for the fused ops: the shared decomposition, run eagerly.

A fused node's reference is ``moec.moe.decompose`` (or ``decompose_spectral``) executed op
by op with the primitive kernels, through a builder that computes each value as it is
added. It is the same code that wrote the unfused graph, so interpreting the fused graph
gives the same numbers as interpreting the unfused one, bit for bit.
"""

from __future__ import annotations

from moec.backends.reference import dense, routing
from moec.ir.graph import Ref
from moec.moe import BAND_TABLE, decompose, decompose_spectral, placeholders

PRIMITIVES = {**dense.KERNELS, **routing.KERNELS}


class _Eager:
    """A decomposition builder that runs each op at once; refs name the computed values."""

    def __init__(self, ctx, inputs: dict):
        self.ctx = ctx
        self.values = {ref.node: (value,) for ref, value in inputs.items()}

    def add(self, op, inputs, path, outputs=1, **attrs):
        name = f"{op}_{len(self.values)}"
        result = PRIMITIVES[op](self.ctx, attrs, *(self.value(ref) for ref in inputs))
        self.values[name] = result if isinstance(result, tuple) else (result,)
        return Ref(name) if outputs == 1 else tuple(Ref(name, i) for i in range(outputs))

    def mark_moe(self, out, aux, attrs, balance=None) -> None:
        pass

    def value(self, ref: Ref):
        return self.values[ref.node][ref.index]


def _bind(ctx, attrs, inputs) -> tuple[_Eager, dict[str, Ref]]:
    stand_ins = placeholders(attrs["slots"])
    runner = _Eager(ctx, {stand_ins[slot]: value for slot, value in zip(attrs["slots"], inputs)})
    return runner, stand_ins


def moe(ctx, attrs, *inputs):
    runner, slots = _bind(ctx, attrs, inputs)
    return tuple(runner.value(ref) for ref in decompose(runner, attrs["moe"], slots["h"], slots["router_in"], slots))


def spectral_moe(ctx, attrs, *inputs):
    """rfft -> real view -> depth x (z + moe(z)) with shared weights -> complex -> irfft."""
    runner, slots = _bind(ctx, attrs, inputs)
    out, aux = decompose_spectral(runner, attrs["moe"], slots["x"], slots, depth=attrs["depth"],
                                  fft_norm=attrs["fft_norm"], band=attrs["band"], table=slots.get(BAND_TABLE),
                                  residual=attrs.get("residual", True))
    return runner.value(out), runner.value(aux)


KERNELS = {"moe": moe, "spectral_moe": spectral_moe}
