"""What context parallelism (``sharding.sequence``) runs: each rank holds 2 of the 2 x cp chunks of every
sequence (``moec.backends.torch.context_parallel``), so every layer must compute a position's output from
that position alone or, for attention, from the keys and values the cp group gathers.

Runs today: token or continuous models (every position predicted, or head.pool 'last': cp rank 0
holds the last position) of attention (no sinks), mlp, dropless token-routed moe and spectral_moe
layers (the distributed rfft: each rank transforms the whole sequence for d_model / cp channels, so
cp divides d_model), with data parallelism (DDP) or FSDP over the batch axes, or expert parallelism
(over a batch axis or the cp axis: cp ranks are data ranks for it, as in torchtitan). Refused here, each by
name: the layer kinds that mix the sequence otherwise (mla, dynamics: not yet), what needs the whole
sequence on one rank (learned positions, multi-token prediction), routing that depends on the rank's
token set (capacity, sinkhorn, per-sequence or pooled balance, a spectral layer's per-band experts),
and the combinations with tensor and pipeline parallelism, expert parallelism with FSDP, and HSDP
that parallel.py does not build yet.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

Finding = tuple[tuple, str]
LAYER_KINDS = ("attention", "mlp", "moe", "spectral_moe")  # what runs on a rank's part of the sequence


def context_checks() -> tuple:
    return (_one_axis, _model_fits, _layers_fit, _channels_split, _parallel_combinations)


def _cp(spec) -> int:
    return math.prod(spec.mesh.axes.get(axis, 1) for axis in spec.sharding.sequence)


def _one_axis(spec) -> Iterator[Finding]:
    if len(spec.sharding.sequence) > 1:
        yield ("sharding", "sequence", 1), "context parallelism splits the sequence over one axis only"


def _model_fits(spec) -> Iterator[Finding]:
    if _cp(spec) == 1:
        return
    model, why = spec.model, "context parallelism (sharding.sequence) "
    if model.position == "learned":
        yield ("model", "position"), why + "does not read learned position embeddings at the ranks' global positions yet"
    if getattr(model.head, "mtp", None) is not None:
        yield ("model", "head", "mtp"), why + "does not shift the multi-token targets across the ranks' chunks yet"


def _layers_fit(spec) -> Iterator[Finding]:
    if _cp(spec) == 1:
        return
    scopes = set()
    for b, i, layer in spec.model.layers():
        path = ("model", "blocks", b, "layers", i)
        if layer.kind not in LAYER_KINDS:
            yield path + ("kind",), (f"'{layer.kind}' cannot run with the sequence split over ranks yet (context parallelism "
                                     f"runs {', '.join(LAYER_KINDS)} layers)")
        elif layer.kind == "attention" and layer.sinks:
            yield path + ("sinks",), "attention sinks are not implemented with context parallelism yet"
        elif layer.kind in ("moe", "spectral_moe"):
            moe = layer if layer.kind == "moe" else layer.moe
            yield from _moe_fits(moe, path if layer.kind == "moe" else path + ("moe",))
            if layer.kind == "spectral_moe":
                yield from _spectral_fits(layer, path)
            if moe.aux.load_balance > 0:
                scopes.add(moe.aux.load_balance_batch)
    if len(scopes) > 1:  # one group per program: the cp group, or dp x cp (parallel.py's use_batch_group)
        yield ("sharding", "sequence"), ("with context parallelism every MoE layer's aux.load_balance_batch must agree "
                                         "(local: counts over the cp group, global: over dp x cp)")


def _moe_fits(layer, path: tuple) -> Iterator[Finding]:
    """The routing of a token must not depend on which tokens share its rank."""
    if layer.capacity.mode != "dropless":
        yield path + ("capacity", "mode",), "capacity is counted per rank's tokens; context parallelism needs dropless"
    if layer.router.kind in ("sinkhorn", "expert_choice"):
        yield path + ("router", "kind"), (f"'{layer.router.kind}' routes over the rank's tokens together; context "
                                          "parallelism needs a per-token router")
    if layer.aux.load_balance_scope != "layer":
        yield path + ("aux", "load_balance_scope"), (f"'{layer.aux.load_balance_scope}' balance is not summed over the "
                                                     "context-parallel ranks yet; use 'layer'")


def _spectral_fits(layer, path: tuple) -> Iterator[Finding]:
    if layer.bands is not None:
        yield path + ("bands",), "per-band experts are not implemented with context parallelism yet (each rank holds some bins)"


def _channels_split(spec) -> Iterator[Finding]:
    """The distributed rfft gives each rank the whole sequence of d_model / cp channels, then some of the bins."""
    cp = _cp(spec)
    spectral = next(((b, i) for b, i, layer in spec.model.layers() if layer.kind == "spectral_moe"), None)
    if cp > 1 and spectral is not None and spec.model.d_model % cp:
        yield ("model", "d_model"), (f"must be divisible by the context-parallel size ({cp}): the spectral_moe layer's rfft "
                                     f"(model.blocks[{spectral[0]}].layers[{spectral[1]}]) runs on d_model / cp channels "
                                     f"per rank, got {spec.model.d_model}")


def _parallel_combinations(spec) -> Iterator[Finding]:
    if _cp(spec) == 1:
        return
    sharding, axes = spec.sharding, spec.mesh.axes
    path = ("sharding", "sequence")
    if sharding.tensor is not None and axes.get(sharding.tensor.axis, 1) > 1:
        yield path, "context parallelism with tensor parallelism (sharding.tensor) is not implemented yet"
    if sharding.pipeline is not None and axes.get(sharding.pipeline.axis, 1) > 1:
        yield path, "context parallelism with pipeline parallelism (sharding.pipeline) is not implemented yet"
    fsdp = {axis for axis in sharding.fsdp if axes.get(axis, 1) > 1}
    if fsdp and any(axes.get(axis, 1) > 1 for axis in sharding.experts):
        yield path, "context parallelism with expert parallelism and FSDP (sharding.experts with sharding.fsdp) is not implemented yet"
    if fsdp and any(axes.get(axis, 1) > 1 and axis not in fsdp for axis in sharding.batch):
        yield path, "context parallelism with HSDP (a batch axis outside sharding.fsdp next to one inside) is not implemented yet"
