"""Checks that need more than one section of a resolved spec.

Each check yields ``(key_path, message)``; ``moec.schema.validate`` turns them into
located :class:`SpecIssue` objects and reports all of them together.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Iterator

from moec.layers import LAYER_KINDS
from moec.schema.checks_context import context_checks
from moec.schema.checks_precision import precision_checks
from moec.schema.checks_schedule import schedule_checks
from moec.schema.checks_tensor import tensor_checks
from moec.schema.errors import format_path
from moec.schema.spec import Spec
from moec.schema.train import DEFAULT_COLLECTIVE_TIMEOUT_S

Finding = tuple[tuple, str]
MAX_PARAMS = 10**13  # 10T: far past any model this compiler targets, far short of overflow
MAX_DFT_LEN = 4096  # beyond this a DFT matmul costs more memory than it is worth
MAX_LAYERS = 4096  # unrolled layers: 40x gpt_oss_120b's; a graph of ~100 nodes each stays cheap to build


def run_checks(spec: Spec) -> list[Finding]:
    findings: list[Finding] = []
    for check in (
        _sharding_axes,
        _parallel_divisibility,
        _batch_divisibility,
        _sequence_fits,
        _future_leaks,
        _data_matches_model,
        _options_are_used,
        *schedule_checks(),
        *precision_checks(),
        *tensor_checks(),
        *context_checks(),
        _expert_placement,
        _kernels_serve_spec,
        _pooled_load_balance,
        _mtp_parallelism,
        _size_is_sane,
        _loggers_installed,
    ):
        findings.extend(check(spec))
    return findings


def checks_on_partial_spec() -> tuple:
    """The checks that read only plain fields (nothing ``resolve`` fills): they also run on a spec whose
    other parts failed validation (moec.schema.partial), so one pass reports every section's errors."""
    return (_sharding_axes, _parallel_divisibility, _batch_divisibility, _sequence_fits, _data_matches_model)


def axis_size(spec: Spec, axes: list[str]) -> int:
    return math.prod(spec.mesh.axes.get(axis, 1) for axis in axes)


def _axis_roles(spec: Spec) -> Iterator[tuple[tuple, str, str]]:
    """``(path, axis, role)`` for every axis the sharding section names."""
    sharding = spec.sharding
    for role in ("batch", "sequence", "experts", "fsdp"):
        for i, axis in enumerate(getattr(sharding, role)):
            yield ("sharding", role, i), axis, role
    if sharding.tensor is not None:
        yield ("sharding", "tensor", "axis"), sharding.tensor.axis, "tensor"
    if sharding.pipeline is not None:
        yield ("sharding", "pipeline", "axis"), sharding.pipeline.axis, "pipeline"


# Roles that may share an axis: FSDP shards over data-parallel ranks; expert-parallel
# ranks may also take different slices of the batch, and shard the other parameters with
# FSDP (the experts are split over that axis already: torchtitan's dp-shard-in-ep). Context-parallel
# ranks hold other positions of the sequences, so they may be expert-parallel ranks too (torchtitan's
# ep over dp-shard x cp).
_COMPATIBLE = {frozenset({"batch", "fsdp"}), frozenset({"batch", "experts"}), frozenset({"fsdp", "experts"}),
               frozenset({"sequence", "experts"})}


def _sharding_axes(spec: Spec) -> Iterator[Finding]:
    roles_of: dict[str, list[str]] = {}
    for path, axis, role in _axis_roles(spec):
        if axis not in spec.mesh.axes:
            yield path, f"axis '{axis}' is not in the mesh (mesh axes: {', '.join(spec.mesh.axes)})"
            continue
        if role in roles_of.get(axis, []):
            yield path, f"axis '{axis}' is listed twice for {role}"
            continue
        for other in roles_of.get(axis, []):
            if frozenset({role, other}) not in _COMPATIBLE:
                yield path, f"axis '{axis}' already splits {other}; it cannot also split {role}"
        roles_of.setdefault(axis, []).append(role)
    for i, axis in enumerate(spec.sharding.fsdp):
        if axis in spec.mesh.axes and axis not in spec.sharding.batch:
            yield ("sharding", "fsdp", i), f"FSDP axis '{axis}' must also split the batch (add it to sharding.batch)"
    for axis, size in spec.mesh.axes.items():
        if size > 1 and axis not in roles_of:
            yield ("mesh", "axes", axis), f"axis '{axis}' has size {size} but splits nothing; name it in the sharding section"


def _layer_path(block: int, layer: int, *rest) -> tuple:
    return ("model", "blocks", block, "layers", layer, *rest)


def _parallel_divisibility(spec: Spec) -> Iterator[Finding]:
    ep = axis_size(spec, spec.sharding.experts)
    tp = axis_size(spec, [spec.sharding.tensor.axis]) if spec.sharding.tensor else 1
    for b, i, layer in spec.model.layers():
        checks: list[tuple[tuple, int, int, str]] = []
        if layer.kind == "attention":
            checks.append((("heads",), layer.heads, tp, "tensor-parallel"))
            if layer.kv_heads % tp and tp % layer.kv_heads:  # fewer KV heads than ranks: each is replicated on tp / kv_heads
                yield _layer_path(b, i, "kv_heads"), (f"must be divisible by the tensor-parallel size ({tp}) or divide it "
                                                      f"(each KV head then replicated on tp / kv_heads ranks), got {layer.kv_heads}")
            if layer.rope is not None and layer.head_dim % 2:
                yield _layer_path(b, i, "head_dim"), f"must be even for RoPE, got {layer.head_dim}"
        elif layer.kind == "mla":  # its heads split over tp (the latents stay whole)
            checks.append((("heads",), layer.heads, tp, "tensor-parallel"))
        elif layer.kind == "mlp":
            checks.append((("hidden",), layer.hidden, tp, "tensor-parallel"))
        elif layer.kind in ("moe", "spectral_moe"):
            moe, prefix = (layer, ()) if layer.kind == "moe" else (layer.moe, ("moe",))
            checks.append((prefix + ("experts",), moe.experts, ep, "expert-parallel"))
            checks.append((prefix + ("expert", "hidden"), moe.expert.hidden, tp, "tensor-parallel"))
        for rest, value, size, what in checks:
            if value % size:
                yield _layer_path(b, i, *rest), f"must be divisible by the {what} size ({size}), got {value}"
    if spec.sharding.pipeline is not None:
        stages = axis_size(spec, [spec.sharding.pipeline.axis])
        if spec.model.num_layers < stages:
            yield ("sharding", "pipeline", "axis"), f"{stages} pipeline stages but only {spec.model.num_layers} blocks"


def _mtp_parallelism(spec: Spec) -> Iterator[Finding]:
    """What multi-token prediction (head.mtp) runs under: every parallelism but pipeline and sequence parallelism.
    Under ep its blocks' MoE layers dispatch as the model's do, under tp its blocks split as the last block does."""
    mtp = getattr(spec.model.head, "mtp", None)
    if mtp is None:
        return
    path, sharding = ("model", "head", "mtp"), spec.sharding
    if sharding.pipeline is not None and axis_size(spec, [sharding.pipeline.axis]) > 1:
        # as torchtitan's deepseek_v3 refuses it: the MTP modules read the embedding (the first stage's) and the last
        # block's hidden state and the head (the last stage's), and their loss is not the last stage's logits alone
        yield path, ("multi-token prediction is not supported with pipeline parallelism (torchtitan's DeepSeek-V3 "
                     "refuses it too): its modules need the first stage's embedding and the last stage's hidden state "
                     "and head; remove head.mtp or sharding.pipeline")
    tensor = sharding.tensor
    if tensor is not None and tensor.sequence_parallel and axis_size(spec, [tensor.axis]) > 1:
        yield path, ("multi-token prediction is not supported with sequence parallelism yet: parallel.py splits the "
                     "model's blocks over S / tp positions, not the MTP modules' blocks; remove "
                     "sharding.tensor.sequence_parallel")
    if spec.train.seq_len <= mtp.depth:
        yield path, f"depth {mtp.depth} leaves no position with a target at train.seq_len {spec.train.seq_len}"


def _batch_divisibility(spec: Spec) -> Iterator[Finding]:
    dp = axis_size(spec, spec.sharding.batch)
    micro = spec.sharding.pipeline.microbatches if spec.sharding.pipeline else 1
    unit = dp * spec.train.grad_accum * micro
    if spec.train.batch % unit:
        parts = f"data-parallel size {dp} x grad_accum {spec.train.grad_accum}" + (f" x microbatches {micro}" if micro > 1 else "")
        yield ("train", "batch"), f"must be divisible by {unit} ({parts}), got {spec.train.batch}"


def _sequence_fits(spec: Spec) -> Iterator[Finding]:
    seq = spec.train.seq_len
    if seq > spec.model.max_seq_len:
        yield ("train", "seq_len"), f"must be <= model.max_seq_len ({spec.model.max_seq_len}), got {seq}"
    cp = axis_size(spec, spec.sharding.sequence)
    if cp > 1 and seq % (2 * cp):  # the load-balanced split: 2 x cp equal chunks (moec.backends.torch.context_parallel)
        yield ("train", "seq_len"), f"must be divisible by 2 x the context-parallel size ({2 * cp}: 2 chunks per rank), got {seq}"
    for b, i, layer in spec.model.layers():
        if layer.kind != "spectral_moe":
            continue
        if seq < 2:
            yield ("train", "seq_len"), f"must be >= 2 for a spectral_moe layer (model.blocks[{b}].layers[{i}]), got {seq}"
        if spec.schedule.kernels.spectral_moe == "dft" and seq > MAX_DFT_LEN:
            yield ("schedule", "kernels", "spectral_moe"), f"'dft' is limited to sequences of {MAX_DFT_LEN}; train.seq_len is {seq} (use 'fft' or 'auto')"


def _future_leaks(spec: Spec) -> Iterator[Finding]:
    """Every task is next-step prediction: a layer that sees the whole sequence must not feed per-position targets."""
    if spec.model.head.pool != "none":
        return
    for b, i, layer in spec.model.layers():
        if layer.kind == "moe" and layer.router.expert_choice:
            what = "expert_choice routing lets each expert pick from every token of the batch, later positions included"
        elif layer.kind == "spectral_moe":
            what = "spectral_moe mixes the whole sequence"
        elif layer.kind == "attention" and not layer.causal:
            what = "non-causal attention sees later positions"
        else:
            continue
        yield ("model", "head", "pool"), (
            f"{what} (model.blocks[{b}].layers[{i}]), so per-position next-step targets would leak the future; set pool: last"
        )
        return


def _data_matches_model(spec: Spec) -> Iterator[Finding]:
    data, inputs, head = spec.train.data, spec.model.inputs, spec.model.head
    path = ("train", "data", "kind")
    if data.kind in ("text", "random_tokens", "token_files", "hf_dataset") and inputs.kind != "tokens":
        yield path, f"'{data.kind}' data needs token inputs, but model.inputs.kind is '{inputs.kind}'"
    if data.kind == "hf_dataset":
        if not _installed("datasets"):
            yield path, "'hf_dataset' needs the datasets package: pip install 'moec[hf-data]'"
        yield from _token_files_exist(data)
        yield from _dataset_formats(data)
    if data.kind in ("text", "hf_dataset") and data.tokenizer != "bytes":
        yield from _tokenizer_fits(data.tokenizer, inputs)
    elif data.kind in ("text", "hf_dataset") and inputs.kind == "tokens" and inputs.vocab < 256:
        yield ("model", "inputs", "vocab"), f"must be >= 256 for byte-level text data, got {inputs.vocab}"
    if data.kind == "token_files":
        if data.dtype == "uint16" and inputs.kind == "tokens" and inputs.vocab > 1 << 16:
            yield ("train", "data", "dtype"), f"uint16 holds ids below 65536, but model.inputs.vocab is {inputs.vocab}; use uint32"
        yield from _token_files_exist(data)
    wanted_dims = {"signals": 1, "trajectories": 3}.get(data.kind)
    if wanted_dims is not None:
        if inputs.kind != "continuous":
            yield path, f"'{data.kind}' data needs continuous inputs, but model.inputs.kind is '{inputs.kind}'"
        elif inputs.dims != wanted_dims:
            yield ("model", "inputs", "dims"), f"must be {wanted_dims} for '{data.kind}' data, got {inputs.dims}"
    # out_dims None (the default) resolves to inputs.dims; this check also runs on unresolved partial specs
    if head.kind == "regression" and inputs.kind == "continuous" and head.out_dims not in (None, inputs.dims):
        yield ("model", "head", "out_dims"), f"must equal inputs.dims ({inputs.dims}) to predict the next value, got {head.out_dims}"


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _tokenizer_fits(path: str, inputs) -> Iterator[Finding]:
    """The tokenizer file exists, is a Hugging Face tokenizer.json, and its ids fit the model's vocabulary."""
    where = ("train", "data", "tokenizer")
    if not _installed("tokenizers"):
        yield where, "a tokenizer.json needs the tokenizers package: pip install 'moec[tokenizers]'"
        return
    try:
        size = tokenizer_vocab_size(path)
    except ValueError as err:
        yield where, str(err)
        return
    if inputs.kind == "tokens" and inputs.vocab < size:
        yield ("model", "inputs", "vocab"), f"must be >= {size} for the ids of tokenizer {path}, got {inputs.vocab}"


def tokenizer_vocab_size(path: str) -> int:
    """1 + the largest id of a tokenizer.json (its model's vocabulary and its added tokens), read as JSON."""
    import json
    import os

    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        vocab = data["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))  # BPE / WordPiece, Unigram
        ids += [token["id"] for token in data.get("added_tokens") or []]
        return max(ids) + 1
    except FileNotFoundError:
        raise ValueError(f"{path!r}: no such file (resolved against {os.getcwd()})") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path!r} is not a Hugging Face tokenizer.json ({type(err).__name__}: {err})") from None


DATASET_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}


def _dataset_formats(data) -> Iterator[Finding]:
    """hf_dataset files are of a format `datasets` reads locally, one format per split."""
    import os

    for split in ("train", "val"):
        formats = set()
        for i, pattern in enumerate(getattr(data, split)):
            ext = os.path.splitext(pattern)[1].lower()
            if ext not in DATASET_FORMATS:
                yield ("train", "data", split, i), f"{pattern!r}: not a dataset file this reads ({', '.join(DATASET_FORMATS)})"
            formats.add(DATASET_FORMATS.get(ext))
        if len(formats) > 1:
            yield ("train", "data", split), f"mixes formats {sorted(f for f in formats if f)}; use one format per split"


def _token_files_exist(data) -> Iterator[Finding]:
    """Every path or glob of the data's files matches a file (resolved against the current directory)."""
    import glob
    import os

    for split in ("train", "val"):
        for i, pattern in enumerate(getattr(data, split)):
            if next((path for path in glob.iglob(pattern, recursive=True) if os.path.isfile(path)), None) is None:
                yield ("train", "data", split, i), f"{pattern!r} matches no file (resolved against {os.getcwd()})"


def _loggers_installed(spec: Spec) -> Iterator[Finding]:
    for i, logger in enumerate(spec.train.log):
        if logger in ("tensorboard", "wandb") and not _installed(logger):
            yield ("train", "log", i), f"'{logger}' needs the {logger} package: pip install 'moec[{logger}]'"


def _options_are_used(spec: Spec) -> Iterator[Finding]:
    """Options that only matter for layers the model does not have."""
    kinds = {layer.kind for _, _, layer in spec.model.layers()}
    has_moe = bool(kinds & {"moe", "spectral_moe"})
    optimizer = spec.train.optimizer
    for group in ("lr_router", "lr_experts"):
        if not has_moe and getattr(optimizer, group) != optimizer.lr:
            yield ("train", "optimizer", group), "is set but the model has no moe or spectral_moe layer"
    if spec.mesh.world_size == 1 and spec.train.collective_timeout_s != DEFAULT_COLLECTIVE_TIMEOUT_S:
        yield ("train", "collective_timeout_s"), "is used only when the mesh has more than one device (world_size is 1)"
    for op in ("moe", "spectral_moe"):
        if getattr(spec.schedule.kernels, op) != "auto" and op not in kinds:
            yield ("schedule", "kernels", op), f"chooses a kernel for '{op}', but the model has no {op} layer"


def _expert_placement(spec: Spec) -> Iterator[Finding]:
    if spec.sharding.placement == "contiguous":
        return
    if axis_size(spec, spec.sharding.experts) == 1:
        yield ("sharding", "placement"), "is used only with expert parallelism (sharding.experts over an axis larger than 1)"
    if axis_size(spec, spec.sharding.fsdp) > 1:  # FSDP2 re-registers the parameters that carry EXPERT_ORDER
        yield ("sharding", "placement"), "consistent_hash is not executed together with FSDP yet (sharding.fsdp); use contiguous"
    counts = sorted({moe.experts for _, moe in _moe_configs(spec)})
    if len(counts) > 1:  # one EXPERT_PLACEMENT table serves every layer
        yield ("sharding", "placement"), f"needs the same expert count in every MoE layer, got {', '.join(map(str, counts))}"


def _moe_configs(spec: Spec) -> Iterator[tuple[tuple, object]]:
    for b, i, layer in spec.model.layers():
        if layer.kind == "moe":
            yield _layer_path(b, i), layer
        elif layer.kind == "spectral_moe":
            yield _layer_path(b, i, "moe"), layer.moe


def _kernels_serve_spec(spec: Spec) -> Iterator[Finding]:
    """A kernel choice that cannot run some layer of the model is refused here, not at build time."""
    kernel, path = spec.schedule.kernels.moe, ("schedule", "kernels", "moe")
    if kernel == "triton" and importlib.util.find_spec("triton") is None:
        yield path, "'triton' needs the triton package (pip install 'moec[triton]'); use 'auto', 'grouped_mm', 'bmm' or 'eager'"
    elif kernel == "bmm":
        for where, moe in _moe_configs(spec):
            if moe.capacity.mode != "capacity":
                yield path, (f"'bmm' pads every expert to a fixed capacity, but {format_path(where)} is dropless "
                             "(use 'grouped_mm', or capacity.mode 'capacity')")
                return


def _pooled_load_balance(spec: Spec) -> Iterator[Finding]:
    """``aux.load_balance_scope: model`` pools every MoE layer into one loss: the layers must agree on it."""
    configs = list(_moe_configs(spec))
    pooled = [(where, moe) for where, moe in configs if moe.aux.load_balance_scope == "model"]
    if not pooled:
        return
    first_where, first = pooled[0]
    for where, moe in configs:
        path = where + ("aux", "load_balance_scope")
        if where[-1] == "moe":
            yield path, "'model' pools token-routed MoE layers; a spectral_moe layer routes frequency bands (use 'layer')"
        elif moe.router.expert_choice:
            yield path, "'model' does not apply to expert_choice (its load balance is constant)"
        elif moe.aux.load_balance_scope != "model":
            yield path, f"must be the same in every MoE layer: {format_path(first_where)} pools over the model"
        elif (moe.experts, moe.top_k, moe.aux.load_balance) != (first.experts, first.top_k, first.aux.load_balance):
            yield path, (f"pools with {format_path(first_where)}, so experts, top_k and aux.load_balance must match it "
                         f"({first.experts}, {first.top_k}, {first.aux.load_balance}), got ({moe.experts}, {moe.top_k}, "
                         f"{moe.aux.load_balance})")


def _size_is_sane(spec: Spec) -> Iterator[Finding]:
    layers = sum(block.repeat * sum(getattr(layer, "depth", 1) for layer in block.layers) for block in spec.model.blocks)
    if layers > MAX_LAYERS:
        yield ("model", "blocks"), (f"unroll to {layers} layers (repeat x layers, a spectral_moe counted once per depth step), "
                                    f"over the limit of {MAX_LAYERS}")
        return  # counting parameters of a layer bomb is fine, but one message is enough
    params = estimate_params(spec)
    if params > MAX_PARAMS:
        yield ("model",), f"has about {params:.3g} parameters, over the {MAX_PARAMS:.0e} limit"


def estimate_params(spec: Spec) -> int:
    """Every parameter and buffer the lowering creates, from the spec alone (exact: tested per spec)."""
    model, d = spec.model, spec.model.d_model
    total = model.inputs.vocab * d if model.inputs.kind == "tokens" else model.inputs.dims * d + d
    total += model.max_seq_len * d if model.position == "learned" else 0
    for block in model.blocks:
        total += block.repeat * _block_params(spec, block)
    total += _norm_params(model.final_norm, d) if model.final_norm is not None else 0
    if model.head.kind == "lm":
        if model.head.mtp is not None:  # per depth: enorm, hnorm, eh_proj [d, 2d], a copy of the last block, norm
            total += model.head.mtp.depth * (3 * d + 2 * d * d + _block_params(spec, model.blocks[-1]))
        return total + (0 if model.head.tie_embeddings else model.inputs.vocab * d)
    return total + model.head.out_dims * (d + 1)


def _block_params(spec: Spec, block) -> int:
    norm = _norm_params(block.norm, spec.model.d_model)  # every wrapped layer (all but dynamics) has its own norm
    kinds = [LAYER_KINDS[layer.kind] for layer in block.layers]
    return sum(kind.params(layer, spec) + (norm if kind.wrapped else 0) for kind, layer in zip(kinds, block.layers))


def _norm_params(norm, width: int) -> int:
    return width if norm.kind == "rmsnorm" else 2 * width
