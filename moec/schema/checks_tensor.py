"""What tensor parallelism (``sharding.tensor`` over an axis larger than 1) can split, checked here.

moec splits the Megatron pairs: a column group (split output features) feeding its row group
(split input features), with one all-reduce forward at the row end and one backward at the column
end. Refused here, with the field to change: a group in the other list than its pair needs, half
a pair, and layer options whose weights the split does not cover
(attention biases, sinks and q/k norms; MLP biases; expert biases, shared experts, capacity and
kernels other than grouped_mm); ``sequence_parallel`` beyond attention, MLA and MLP layers, with FSDP,
or with a sequence length tp does not divide. The vocabulary split (``embed``, ``head``, Megatron's
vocab-parallel embedding and head) is a column split of token models whose vocabulary tp divides;
tied embeddings split both or neither. Sizes are checked with the other
parallel sizes (``checks._parallel_divisibility``): heads (attention's and MLA's) and hidden sizes divisible by tp, kv_heads
divisible by tp or dividing it (each KV head then replicated on tp / kv_heads ranks,
``moec.passes.sharding.replicated_kv``).
Tensor with expert parallelism (experts
split over ep, each expert's hidden size over tp: Megatron's layout) validates; the combinations it does
not run yet (with FSDP, ep outside the batch axes, consistent_hash) stop at launch by name.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

Finding = tuple[tuple, str]

# column group -> the row group it feeds
PAIRS = {"attention.qkv": "attention.out", "mlp.up": "mlp.down", "experts.up": "experts.down"}
VOCAB = ("embed", "head")


def tensor_checks() -> tuple:
    return (_groups, _vocab, _layers, _sequence_parallel)


def _split(spec):
    """The TensorParallel section when its axis is larger than 1."""
    tensor = spec.sharding.tensor
    return tensor if tensor is not None and spec.mesh.axes.get(tensor.axis, 1) > 1 else None


def _groups(spec) -> Iterator[Finding]:
    tensor = _split(spec)
    if tensor is None:
        return
    for side, wrong in (("column", set(PAIRS.values())), ("row", set(PAIRS))):
        for i, group in enumerate(getattr(tensor, side)):
            if group in wrong:
                right = "row" if side == "column" else "column"
                yield ("sharding", "tensor", side, i), (f"{group} splits by {right}s in Megatron's pairs (column: "
                                                        f"{', '.join(PAIRS)}; row: {', '.join(PAIRS.values())}); move it")
    for column, row in PAIRS.items():
        if (column in tensor.column) != (row in tensor.row):
            have, missing = (column, f"{row} in row") if column in tensor.column else (row, f"{column} in column")
            side = "column" if column in tensor.column else "row"
            yield ("sharding", "tensor", side), (f"{have} is split but its pair is not: add {missing} (a column split's "
                                                 "partial outputs must feed the row split)")


def _vocab(spec) -> Iterator[Finding]:
    """The vocabulary split: rows of the [V, D] embedding table and head over tp."""
    tensor = _split(spec)
    if tensor is None:
        return
    for i, group in enumerate(tensor.row):
        if group in VOCAB:
            yield ("sharding", "tensor", "row", i), f"{group} splits the vocabulary (its rows): list it under column"
    split = [group for group in VOCAB if group in tensor.column]
    if not split:
        return
    model, tp = spec.model, spec.mesh.axes[tensor.axis]
    at = ("sharding", "tensor", "column")
    if "embed" in split and model.inputs.kind != "tokens":
        yield at, f"embed splits the token embedding's vocabulary; model.inputs is {model.inputs.kind}: remove embed"
    if "head" in split and model.head.kind != "lm":
        yield at, f"head splits the vocabulary of an lm head; model.head is {model.head.kind}: remove head"
    if model.inputs.kind == "tokens" and model.inputs.vocab % tp:
        yield ("model", "inputs", "vocab"), (f"must be divisible by the tensor-parallel size ({tp}) to split the vocabulary, "
                                             f"got {model.inputs.vocab}: pad it (e.g. {-(-model.inputs.vocab // tp) * tp})")
    if model.head.kind == "lm" and model.head.tie_embeddings and len(split) == 1:
        yield at, f"{split[0]} is split but the head shares the embedding table (model.head.tie_embeddings): split both or neither"


def _layers(spec) -> Iterator[Finding]:
    tensor = _split(spec)
    if tensor is None:
        return
    for b, i, layer in spec.model.layers():
        path = ("model", "blocks", b, "layers", i)
        if layer.kind == "attention" and "attention.qkv" in tensor.column:
            for field, value in (("bias", layer.bias), ("sinks", layer.sinks), ("qk_norm", layer.qk_norm)):
                if value:
                    yield path + (field,), f"is not implemented under tensor parallelism (attention.qkv split over {tensor.axis})"
        elif layer.kind == "mlp" and "mlp.up" in tensor.column and layer.bias:
            yield path + ("bias",), f"is not implemented under tensor parallelism (mlp.up split over {tensor.axis})"
        elif layer.kind in ("moe", "spectral_moe") and "experts.up" in tensor.column:
            yield from _experts(spec, layer, path, tensor.axis)
    kernel = spec.schedule.kernels.moe
    if "experts.up" in tensor.column and kernel not in ("auto", "grouped_mm") and any(
            layer.kind in ("moe", "spectral_moe") for _, _, layer in spec.model.layers()):
        yield ("schedule", "kernels", "moe"), (f"'{kernel}' is not implemented under tensor parallelism (experts.up split "
                                               f"over {tensor.axis}): use auto or grouped_mm")


def _experts(spec, layer, path: tuple, axis: str) -> Iterator[Finding]:
    why = f"is not implemented under tensor parallelism (experts.up split over {axis})"
    if layer.kind == "spectral_moe":
        yield path + ("kind",), f"spectral_moe {why}"
        return
    if layer.expert.bias:
        yield path + ("expert", "bias"), why
    if layer.shared_experts is not None:
        yield path + ("shared_experts",), why
    if layer.capacity.mode != "dropless":
        yield path + ("capacity", "mode"), f"capacity {why}: use dropless"


def _sequence_parallel(spec) -> Iterator[Finding]:
    """Megatron-SP over attention, MLA and MLP layers: norms and residuals on S / tp positions between the groups;
    inside an MLA layer the latent projections and norms run on the gathered sequence, whole on every rank."""
    tensor = _split(spec)
    if tensor is None or not tensor.sequence_parallel:
        return
    path, tp = ("sharding", "tensor", "sequence_parallel"), spec.mesh.axes[tensor.axis]
    kinds = sorted({layer.kind for _, _, layer in spec.model.layers()} - {"attention", "mla", "mlp"})
    if kinds:
        yield path, (f"is implemented for attention, mla and mlp layers only; the model has {', '.join(kinds)} "
                     "(its router would see S / tp positions)")
    if "attention.qkv" not in tensor.column and any(layer.kind in ("attention", "mla") for _, _, layer in spec.model.layers()):
        yield path, "needs attention.qkv split by columns: attention must see the whole sequence"
    if math.prod(spec.mesh.axes.get(axis, 1) for axis in spec.sharding.fsdp) > 1:
        yield path, "together with FSDP is not implemented; use plain data parallelism (sharding.batch without sharding.fsdp)"
    if spec.train.seq_len % tp:
        yield ("train", "seq_len"), f"must be divisible by the tensor-parallel size ({tp}) for sequence parallelism, got {spec.train.seq_len}"
