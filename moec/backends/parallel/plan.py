"""The parallel plan of a spec, and the readable ``parallel.py`` that applies it.

Data parallelism runs on PyTorch's own engines. Axes in ``sharding.fsdp`` shard parameters,
gradients and optimizer state with FSDP2 (``fully_shard`` on every block, then the root:
embeddings, final norm, head); a batch axis plus an FSDP axis is HSDP (``fully_shard`` on the
2-D mesh). Batch axes that are not FSDP axes replicate the model with DDP (the composable
``replicate``, which keeps the module tree): FSDP2's own ``replicate`` does not work with
DCP's state-dict API in torch 2.13, and DDP's plain tensors reshard to any data-parallel size.
Expert parallelism shards the routed experts over ``sharding.experts``; with FSDP, the
experts are also FSDP-sharded over the other FSDP axes (torchtitan's dp-shard-in-ep).
Tensor parallelism (``moec.backends.parallel.tensor``) splits the weights over the tp axis
first, then data parallelism applies; with expert parallelism too, ``shard_experts`` makes each
expert weight one 2-D DTensor, experts over ep and each expert's hidden size over tp (Megatron's
layout). Pipeline parallelism runs in ``moec.train.pipeline_step`` (stages of this model, FSDP2
or gradient averaging per stage over the batch axes). ``unsupported`` names what a spec asks for
that this plan cannot run (``moec train`` refuses it at launch; options no engine reads are refused
at validation, ``moec.schema.checks_schedule``, and what context parallelism cannot run,
``moec.schema.checks_context``). Context parallelism
(``sharding.sequence``) splits every sequence over its axis (``moec.backends.torch.context_parallel``): the
attention layers gather keys and values over it, the MoE layers sum their expert counts over it, and
its ranks are data ranks for the gradients (DDP or FSDP over the batch axes x cp, as torchtitan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moec.backends.parallel import checkpointing, tensor
from moec.backends.parallel.float8 import Float8Linears, float8_source
from moec.backends.parallel.placement import (
    experts_of,
    moves_when_growing,
    node_limit,
    physical_order,
    placement,
)
from moec.backends.torch.blocks import attribute_expr
from moec.dtypes import DTYPES, compute_name

DTYPE_NAMES = {name: str(dtype) for name, dtype in DTYPES.items()}  # as the generated parallel.py spells them


@dataclass(frozen=True)
class ParallelPlan:
    axes: dict[str, int]  # the mesh, in spec order
    replicate: tuple[str, ...]  # batch axes that replicate parameters (plain data parallel)
    shard: tuple[str, ...]  # batch axes that shard them (FSDP)
    param_dtype: str
    reduce_dtype: str
    unsupported: tuple[str, ...]  # what the spec asks for that this plan cannot run yet
    experts: str | None = None  # the expert-parallel axis
    expert_modules: tuple[str, ...] = ()  # module paths holding routed experts' weights (blocks.0.moe.experts)
    tensor: str | None = None  # the tensor-parallel axis (larger than 1)
    tensor_splits: tuple[tuple[str, int], ...] = ()  # (parameter name, dim split over tensor)
    sequence_parallel: bool = False  # the blocks' hidden state split along the sequence over tensor
    replicated_kv: tuple[tuple[str, int], ...] = ()  # (k / v projection kept whole on every tp rank, its kv_heads)
    context: str | None = None  # the context-parallel axis (larger than 1): it splits every sequence

    @property
    def gradient_axes(self) -> tuple[str, ...]:
        """The axes gradients are averaged over: the batch axes, and the cp axis, whose ranks hold other tokens."""
        return _in_mesh_order(self, self.data_parallel + ((self.context,) if self.context else ()))

    @property
    def mismatched_gradients(self) -> bool:
        """Some gradients come back placed unlike their parameters (sequence parallel's norms: partial sums; the
        vocabulary-split embedding: whole) and no FSDP redistributes them: ``match_gradient_placements`` does."""
        split_embedding = any(name == "embed.weight" for name, _ in self.tensor_splits)
        return self.tensor is not None and not self.shard and (self.sequence_parallel or split_embedding)

    @property
    def world_size(self) -> int:
        return math.prod(self.axes.values())

    @property
    def data_parallel(self) -> tuple[str, ...]:
        return self.replicate + self.shard

    @property
    def replicated_rows(self) -> bool:
        """Expert parallelism over an axis that does not split the batch or the sequence: its ranks hold the same tokens."""
        return self.experts is not None and self.experts not in self.gradient_axes

    @property
    def expert_fsdp(self) -> tuple[str, ...]:
        """The FSDP axes that also shard the (expert-parallel) experts: all but the ep axis."""
        return tuple(axis for axis in self.shard if axis != self.experts) if self.experts is not None else ()


def parallel_plan(spec, expert_modules: tuple[str, ...] = (), tensor_splits: dict[str, int] | None = None,
                  replicated_kv: dict[str, int] | None = None) -> ParallelPlan:
    """``tensor_splits``: ``moec.backends.parallel.tensor.tensor_splits`` of the compiled graph;
    ``replicated_kv``: ``moec.passes.sharding.replicated_kv`` of it."""
    sharding, mesh = spec.sharding, spec.mesh.axes
    active = {axis for axis, size in mesh.items() if size > 1}
    shard = tuple(axis for axis in sharding.fsdp if axis in active)
    replicate = tuple(axis for axis in sharding.batch if axis in active and axis not in shard)
    experts = [axis for axis in sharding.experts if axis in active]
    unsupported = _expert_parallel_limits(spec, experts, replicate, shard) if experts else []
    if sharding.pipeline is not None and sharding.pipeline.axis in active:
        unsupported += _pipeline_limits(spec, experts, bool(replicate and shard), shard)
    if replicate and shard and (len(replicate) > 1 or len(shard) > 1):
        unsupported.append("HSDP over more than one replicate or shard axis")
    context = next((axis for axis in sharding.sequence if axis in active), None)
    if context is not None:
        unsupported += _context_parallel_limits(spec, experts, replicate, shard)
    precision = spec.schedule.precision  # a reduce dtype DDP cannot use: refused at validation
    return ParallelPlan(dict(mesh), replicate, shard, DTYPE_NAMES[compute_name(precision.compute)], DTYPE_NAMES[precision.reduce],
                        tuple(unsupported), experts[0] if experts else None, expert_modules if experts else (),
                        tensor.tensor_axis(spec), tuple((tensor_splits or {}).items()),
                        tensor.tensor_axis(spec) is not None and sharding.tensor.sequence_parallel,
                        tuple((replicated_kv or {}).items()) if tensor.tensor_axis(spec) is not None else (), context)


def _context_parallel_limits(spec, experts: list[str], replicate: tuple, shard: tuple) -> list[str]:
    """What of the spec's context parallelism this plan cannot run yet (validation refuses these first)."""
    limits = []
    if experts and shard:
        limits.append("context parallelism with expert parallelism and FSDP")
    if tensor.tensor_axis(spec) is not None:
        limits.append("context parallelism with tensor parallelism")
    if spec.sharding.pipeline is not None and spec.mesh.axes.get(spec.sharding.pipeline.axis, 1) > 1:
        limits.append("context parallelism with pipeline parallelism")
    if replicate and shard:
        limits.append("context parallelism with HSDP")
    return limits


def _expert_parallel_limits(spec, experts: list[str], replicate: tuple, shard: tuple) -> list[str]:
    """What of the spec's expert parallelism this plan cannot run yet."""
    limits = []
    if len(experts) > 1:
        limits.append("expert parallelism over several axes")
    if experts[0] not in replicate + shard and shard:
        limits.append("expert parallelism over an axis that does not split the batch, together with FSDP")
    if shard and replicate and experts[0] not in replicate:
        limits.append("expert parallelism over an FSDP axis together with HSDP (a replicating batch axis)")
    if spec.schedule.kernels.moe not in ("auto", "grouped_mm"):
        limits.append(f"expert parallelism with kernels.moe '{spec.schedule.kernels.moe}' (it runs grouped_mm)")
    if tensor.tensor_axis(spec) is not None:  # Megatron's layout runs with plain data parallelism over a batch ep axis
        if shard:
            limits.append("tensor parallelism with expert parallelism and FSDP (sharding.fsdp)")
        if experts[0] not in replicate + shard:
            limits.append("tensor parallelism with expert parallelism over an axis that does not split the batch")
        if spec.sharding.placement != "contiguous":
            limits.append(f"tensor parallelism with expert parallelism and placement {spec.sharding.placement}")
    return limits


def _pipeline_limits(spec, experts: list[str], hsdp: bool, shard: tuple) -> list[str]:
    """What of the spec's pipeline parallelism moec.train.pipeline_step cannot run yet."""
    limits = []
    if experts and shard:  # each stage's FSDP units would have to hold the ep-sharded experts (gather_experts_around)
        limits.append("pipeline parallelism with expert parallelism and FSDP (sharding.experts with sharding.fsdp)")
    if hsdp:  # each stage is FSDP-sharded over all its batch axes, or over none
        limits.append("pipeline parallelism with HSDP (a batch axis outside sharding.fsdp next to one inside)")
    if spec.schedule.precision.compute == "fp16":
        limits.append("pipeline parallelism with fp16 compute (its dynamic loss scale would have to agree across stages)")
    return limits


def _moe_configs(spec):
    """The MoE configuration of every MoE and spectral MoE layer."""
    for _, _, layer in spec.model.layers():
        moe = layer if layer.kind == "moe" else getattr(layer, "moe", None)
        if moe is not None:
            yield moe


def emit_parallel(spec, plan: ParallelPlan, blocks: int, header: list[str], experts: int = 0,
                  stages: tuple[tuple[int, int], ...] = (), cache_input: bool = True, float8: Float8Linears | None = None) -> str:
    """``cache_input``: the model's attention layers take the KV cache as their second input (a decoding model);
    ``float8``: the projections ``compute: fp8`` converts (``moec.backends.parallel.float8``), None otherwise."""
    where, ac = _locator(spec), spec.schedule.activation_checkpointing
    shape, names = tuple(plan.axes.values()), tuple(plan.axes)
    lines = [f"# {line}" if line else "#" for line in header] + [
        "",
        "from __future__ import annotations",
        "",
        *(["import dataclasses", *([""] if ac.mode == "none" else [])] if float8 is not None else []),
        *checkpointing.stdlib_imports(ac.mode),
        "import torch",
        "import torch.distributed as dist",
        "from torch.distributed._composable.replicate import replicate",
        "from torch.distributed.device_mesh import DeviceMesh, init_device_mesh",
        "from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard",
        f"from torch.distributed.tensor import {', '.join(_placement_imports(plan))}",
        *_tensor_imports(spec, plan),
        *checkpointing.torch_imports(ac.mode),
        *_support_imports(plan),
        "",
        f"MESH_SHAPE = {shape!r}  {where('mesh', 'axes')}",
        f"MESH_AXES = {names!r}",
        f"DATA_PARALLEL = {plan.data_parallel!r}  {where('sharding', 'batch')}: each rank reads its slice of the batch",
        f"UNSUPPORTED = {plan.unsupported!r}  # asked for by the spec, not executed yet",
        *([(f"VOCAB_PARALLEL = {plan.tensor!r}  {where('sharding', 'tensor', 'column')}: the head's logits stay split "
            "along the vocabulary; the loss reduces over it")] if tensor.vocab_parallel_output(spec) else []),
        *([f"CONTEXT_PARALLEL = {(plan.context,)!r}  {where('sharding', 'sequence')}: each rank holds chunks r and "
            f"2*{plan.context}-1-r of every sequence cut in 2*{plan.context}"] if plan.context else []),
        *_placement(spec, plan, experts, where),
        *_stages(stages, where),
        "",
        "",
        "def make_mesh(device_type: str) -> DeviceMesh:",
        f"    return init_device_mesh(device_type, MESH_SHAPE, mesh_dim_names=MESH_AXES)  {where('mesh')}",
        "",
        "",
        *(_shard_experts_source(spec, plan, experts, where) + ["", ""] if plan.experts is not None else []),
        *(gather_experts_source() + ["", ""] if plan.expert_fsdp else []),
        *(hsdp_mesh_source() + ["", ""] if plan.replicate and plan.shard else []),
        *(_tensor_parallel_source(spec, plan, where, cache_input) if plan.tensor is not None else []),
        *(use_batch_group_source() + ["", ""] if _sets_batch_group(spec, plan) else []),
        *(use_context_parallel_source() + ["", ""] if plan.context else []),
        *(float8_source(float8, where) if float8 is not None else []),
        *checkpointing.checkpointing_source(ac, blocks, where), "", "",
        "def parallelize(model: torch.nn.Module, mesh: DeviceMesh) -> torch.nn.Module:",
        '    """Data parallelism over the batch axes (FSDP2 per block, then the root; or DDP)'
        + ('.\n    The routed experts are split over the expert-parallel axis first."""' if plan.experts is not None else
           '.\n    Tensor parallelism splits the weights first (torchtitan\'s order)."""' if plan.tensor is not None else '."""'),
        *(["    tensor_parallel(model, mesh)"] if plan.tensor is not None else []),
        *_context_lines(plan, where),
        *_batch_group_lines(spec, plan, where),
        *(_apply_context(plan, blocks, where) if plan.context else _apply(plan, blocks, where)),
        "    return model",
        *_expert_functions(plan),
    ]
    return "\n".join(lines) + "\n"


def _tensor_parallel_source(spec, plan: ParallelPlan, where, cache_input: bool) -> list[str]:
    # under expert parallelism shard_experts splits the experts over ep and tp at once (one 2-D DTensor)
    splits = {name: dim for name, dim in plan.tensor_splits if not _is_expert(plan, name)}
    partial = [*tensor.match_gradient_placements_source(), "", ""] if plan.mismatched_gradients else []
    return [*tensor.tensor_parallel_source(spec, splits, where, dict(plan.replicated_kv), cache_input), "", "", *partial]


def expert_placement(spec, plan: ParallelPlan, experts: int) -> tuple[int, ...]:
    """The owner rank of each expert under the spec's ``sharding.placement`` (seeded by ``train.seed``)."""
    return placement(spec.sharding.placement, experts, plan.axes[plan.experts], spec.train.seed)


def _stages(stages: tuple[tuple[int, int], ...], where) -> list[str]:
    if not stages:
        return []
    return [f"PIPELINE_STAGES = {stages!r}  # (first, last) block of each stage, balanced by forward FLOPs per token  "
            f"{where('sharding', 'pipeline')}"]


def _permuted(spec, plan: ParallelPlan, experts: int) -> bool:
    """Whether the sharded weights' rows differ from expert order (a rank's experts are not consecutive)."""
    if not experts:  # an expert axis but no MoE layer
        return False
    owners = expert_placement(spec, plan, experts)
    return physical_order(owners, plan.axes[plan.experts]) != tuple(range(experts))


def _placement(spec, plan: ParallelPlan, experts: int, where) -> list[str]:
    if plan.experts is None or not experts:
        return []
    ranks, kind = plan.axes[plan.experts], spec.sharding.placement
    owners = expert_placement(spec, plan, experts)
    table = ", ".join(f"{r}: {tuple(held)}" for r, held in enumerate(experts_of(owners, ranks)))
    if kind == "contiguous":
        return [f"EXPERT_PLACEMENT = {{{table}}}  # {plan.experts} rank -> its experts, contiguous  {where('sharding', 'experts')}",
                *[f"# node-limited: {line}" for line in node_limited(spec, plan)]]
    lines = [f"EXPERT_PLACEMENT = {{{table}}}  # {plan.experts} rank -> its experts, {kind} "
             f"(seed {spec.train.seed})  {where('sharding', 'placement')}"]
    if _permuted(spec, plan, experts):
        lines.append(f"EXPERT_ORDER = {physical_order(owners, ranks)!r}  # the expert in each row of the sharded "
                     "weights: rank 0's experts, then rank 1's, ...")
    return lines


def placement_report(spec, plan: ParallelPlan, experts: int) -> list[str]:
    """For ``moec build``: each rank's experts, and how many move when the ep size grows by one."""
    if plan.experts is None or not experts:
        return []
    ranks, kind, seed = plan.axes[plan.experts], spec.sharding.placement, spec.train.seed
    owners = expert_placement(spec, plan, experts)
    lines = [f"expert placement ({kind}, {experts} experts over {plan.experts} {ranks}):"]
    lines += [f"  rank {r}: {' '.join(map(str, held))}" for r, held in enumerate(experts_of(owners, ranks))]
    lines += [f"  node-limited: {line}" for line in node_limited(spec, plan)]
    if ranks + 1 > experts:  # every rank must own an expert: ep cannot grow
        return lines
    growth = {k: moves_when_growing(k, experts, ranks, seed) for k in ("contiguous", "consistent_hash")}
    other = "consistent_hash" if kind == "contiguous" else "contiguous"
    lines.append(f"  {plan.experts} {ranks} -> {ranks + 1} moves {growth[kind]} of {experts} experts "
                 f"({other} would move {growth[other]})")
    return lines


def node_limited(spec, plan: ParallelPlan) -> list[str]:
    """Per distinct group-limited router whose groups line up with the ep ranks: the most ranks a token reaches."""
    ranks, lines = plan.axes[plan.experts], []
    for moe in _moe_configs(spec):
        bound = node_limit(moe.router.groups, moe.router.top_groups, spec.sharding.placement, ranks)
        line = (f"router.groups {moe.router.groups} over {plan.experts} {ranks} ({moe.router.groups // ranks} per rank): "
                f"a token's rows reach at most {bound} ranks (router.top_groups)")
        if bound is not None and line not in lines:
            lines.append(line)
    return lines


def _expert_functions(plan: ParallelPlan) -> list[str]:
    modules = ", ".join(attribute_expr(path, "model") for path in plan.expert_modules)
    lines = ["", "", "def expert_modules(model: torch.nn.Module) -> list[torch.nn.Module]:",
             f"    return [{modules}]", "", "",
             "def expert_parameters(model: torch.nn.Module) -> set[torch.nn.Parameter]:",
             "    return {param for module in expert_modules(model) for param in module.parameters()}", "", "",
             "def reduce_gradients(model: torch.nn.Module, mesh: DeviceMesh) -> None:"]
    if (_tensor_without_fsdp(plan) or plan.mismatched_gradients) and plan.experts is None:
        return lines + tensor.reduce_gradients_lines(plan.mismatched_gradients,
                                                     _flat(_in_mesh_order(plan, plan.data_parallel)) if plan.replicate else None,
                                                     " x ".join(plan.replicate))
    if plan.experts is None:
        return lines + ['    """Nothing to do: DDP / FSDP2 reduce the gradients during backward."""']
    if plan.expert_fsdp:
        return lines + [
            '    """FSDP averaged every gradient over its mesh. An expert\'s owner had already summed its',
            "    expert-parallel group's contributions (the all-to-all's backward), so expert gradients are",
            "    also divided by the ep size (FSDP's own divide factor would need PREMUL_SUM, which gloo lacks).\"\"\"",
            "    for param in expert_parameters(model):",
            "        if param.grad is not None:",
            f"            param.grad.to_local().div_({plan.axes[plan.experts]})  # ep",
        ]
    ranks = plan.gradient_axes  # the batch axes, and cp: its ranks hold other positions of the sequences
    if not ranks:
        return lines + ['    """Nothing to reduce: every rank ran the whole batch, and each expert\'s gradient is complete on its rank."""']
    other = _in_mesh_order(plan, tuple(axis for axis in ranks if axis != plan.experts))
    size = " * ".join(str(plan.axes[a]) for a in ranks)
    lines += [
        '    """Average over the data-parallel ranks. An expert\'s owner already holds the sum over its',
        "    expert-parallel group (the all-to-all's backward brings every rank's rows), so experts are",
        '    summed over the other batch (and cp) axes only, then divided by all data-parallel ranks: averaging',
        '    over ep as well would scale expert gradients by the ep size. One flat all-reduce per',
        '    bucket, not one per parameter; both lists follow model.parameters(), the same on every rank."""',
        "    experts = expert_parameters(model)",
        "    grads = [param for param in model.parameters() if param.grad is not None]",
    ]
    if not plan.shard:
        axes = _in_mesh_order(plan, ranks)
        lines.append(f"    data_parallel = {_flat(axes)}.get_group()  # {' x '.join(axes)}")
        if plan.tensor is not None:
            lines += ["    others = [p.grad for p in grads if p not in experts]",
                      ("    all_reduce_flat([g.to_local() if hasattr(g, 'to_local') else g for g in others], data_parallel, "
                       "op=dist.ReduceOp.AVG)  # tp shards: their part")]
        else:
            lines.append("    all_reduce_flat([p.grad for p in grads if p not in experts], data_parallel, op=dist.ReduceOp.AVG)")
    else:
        lines.append("    # FSDP reduced the other gradients")
    lines.append("    expert_grads = [p.grad.to_local() for p in grads if p in experts]")
    if other:
        lines.append(f"    all_reduce_flat(expert_grads, {_flat(other)}.get_group())  # sum over {' x '.join(other)}")
    return lines + [
        "    for grad in expert_grads:",
        f"        grad.div_({size})  # data-parallel ranks: {' x '.join(ranks)}",
    ]


def _tensor_without_fsdp(plan: ParallelPlan) -> bool:
    """Tensor parallelism with plain data parallelism: reduce_gradients averages (DDP would replace the
    DTensor parameters, which live on another mesh than its own, in its first forward; torch 2.13)."""
    return plan.tensor is not None and bool(plan.replicate) and not plan.shard


def _in_mesh_order(plan: ParallelPlan, axes: tuple[str, ...]) -> tuple[str, ...]:
    """``axes`` as the mesh orders them: a DeviceMesh slice must name its dims in that order."""
    return tuple(axis for axis in plan.axes if axis in axes)


def _apply(plan: ParallelPlan, blocks: int, where) -> list[str]:
    if plan.experts is not None and plan.tensor is not None:  # FSDP with both: refused at launch (UNSUPPORTED)
        averaged = (f"    # data parallel over {' x '.join(plan.data_parallel)}: reduce_gradients averages the gradients  "
                    f"{where('sharding', 'batch')[2:]}")
        return [*_shard_experts_lines(plan, where), averaged]
    if not plan.data_parallel and plan.tensor is not None:
        return ["    # no data-parallel axis larger than 1: every rank reads the whole batch"]
    if _tensor_without_fsdp(plan):
        return [f"    # data parallel over {' x '.join(plan.replicate)}: reduce_gradients averages the gradients  {where('sharding', 'batch')[2:]}"]
    if not plan.data_parallel:
        if plan.experts is not None:
            return _shard_experts_lines(plan, where) + ["    # no data-parallel axis larger than 1: every rank reads the whole batch"]
        return ["    # no data-parallel axis larger than 1: every rank holds the whole model"]
    if plan.experts is not None and not plan.shard:
        # DDP is not used here: its first forward replaces DTensor parameters that live on another
        # mesh than its own (torch 2.13), so reduce_gradients averages the gradients itself.
        return _shard_experts_lines(plan, where)
    if not plan.shard:
        return [
            f"    dp_mesh = {_flat(plan.replicate)}  # replicate over {' x '.join(plan.replicate)}",
            f"    replicate(model, device_mesh=dp_mesh)  # DDP: gradients all-reduced, averaged  {where('sharding', 'batch')}",
        ]
    if plan.replicate:
        mesh, what = f"hsdp_mesh(mesh, {plan.replicate[0]!r}, {plan.shard[0]!r})", f"HSDP: replicate over {plan.replicate[0]}, shard over {plan.shard[0]}"
    else:
        mesh, what = _flat(plan.shard), "FSDP: shard over " + " x ".join(plan.shard)
    ignored = ""
    lines = [
        f"    policy = MixedPrecisionPolicy(param_dtype={plan.param_dtype}, reduce_dtype={plan.reduce_dtype})  "
        f"{where('schedule', 'precision')}",
        f"    dp_mesh = {mesh}  # {what}",
    ]
    if plan.experts is not None:
        lines = _shard_experts_lines(plan, where) + lines + _fsdp_experts_lines(plan)
        ignored = ", ignored_params=expert_parameters(model)" if not plan.expert_fsdp else ""
    return lines + [
        f"    for block in model.blocks:  # blocks.0 .. blocks.{blocks - 1}, one unit each",
        f"        fully_shard(block, mesh=dp_mesh, mp_policy=policy{ignored})  {where('sharding', 'fsdp')}",
        f"    fully_shard(model, mesh=dp_mesh, mp_policy=policy{ignored})  # the root: embeddings, final norm, head",
    ]


def _shard_experts_lines(plan: ParallelPlan, where) -> list[str]:
    axes = _in_mesh_order(plan, (plan.experts, plan.tensor)) if _expert_tp_splits(plan) else (plan.experts,)
    mesh = f"mesh[{axes[0]!r}]" if len(axes) == 1 else f"mesh[{axes!r}]"
    return [
        f"    ep_mesh = {mesh}  # expert parallelism: {_how_rows_travel(plan)}  {where('sharding', 'experts')}",
        "    for experts in expert_modules(model):",
        "        shard_experts(experts, ep_mesh)  # this rank keeps its experts of EXPERT_PLACEMENT",
    ]


def _how_rows_travel(plan: ParallelPlan) -> str:
    if plan.replicated_rows:
        return "each rank runs its experts' rows of the shared batch; an all-gather returns the outputs"
    if _expert_tp_splits(plan):
        return f"routed rows travel by all-to-all over {plan.experts}; each expert's hidden size is split over {plan.tensor}"
    return "routed rows travel by all-to-all"


def _fsdp_experts_lines(plan: ParallelPlan) -> list[str]:
    """Experts under FSDP too: sharded over the FSDP axes other than ep, or left to reduce_gradients."""
    if not plan.expert_fsdp:
        return ["    # no FSDP axis besides ep: the experts stay out of FSDP; reduce_gradients averages them"]
    # blocks.<i>.moe.experts around blocks.<i>; head.mtp's mtp.<k>.block.moe.experts around mtp.<k>.block
    owners = [path.rsplit(".", 2)[0] for path in plan.expert_modules]
    return [
        f"    expert_mesh = {_flat(plan.expert_fsdp)}  # experts: FSDP over {' x '.join(plan.expert_fsdp)}, sharded over ep already",
        "    for experts in expert_modules(model):",
        "        fully_shard(experts, mesh=expert_mesh, mp_policy=policy, reshard_after_forward=False)",
        *[f"    gather_experts_around({attribute_expr(owner, 'model')}, {attribute_expr(path, 'model')})"
          for owner, path in zip(owners, plan.expert_modules)],
    ]


def hsdp_mesh_source() -> list[str]:
    return [
        "def hsdp_mesh(mesh: DeviceMesh, replicate: str, shard: str) -> DeviceMesh:",
        '    """The 2-D (replicate, shard) mesh HSDP wants. A DeviceMesh slice keeps the mesh\'s axis order, so',
        '    when the spec lists the shard axis first the same ranks are laid out again, transposed."""',
        "    names = list(mesh.mesh_dim_names)",
        "    if names.index(replicate) < names.index(shard):",
        "        return mesh[(replicate, shard)]",
        "    rest = [i for i, name in enumerate(names) if name not in (replicate, shard)]",
        "    layout = mesh.mesh.permute(rest + [names.index(replicate), names.index(shard)])",
        "    layout = layout.reshape(-1, mesh[replicate].size(), mesh[shard].size())",
        "    return DeviceMesh(mesh.device_type, layout, mesh_dim_names=('rest', replicate, shard))[(replicate, shard)]",
    ]


def gather_experts_source() -> list[str]:
    return [
        "def gather_experts_around(block: torch.nn.Module, experts: torch.nn.Module) -> None:",
        '    """The block reads the experts\' weights without calling the experts module, so FSDP\'s own hooks',
        "    never run for it: all-gather them before the block; in training FSDP's end-of-backward callback",
        '    reduce-scatters their gradients and reshards them, outside training the block\'s end reshards."""',
        "    block.register_forward_pre_hook(lambda module, args: experts.unshard())",
        "    block.register_forward_hook(lambda module, args, output: None if torch.is_grad_enabled() else experts.reshard())",
    ]


def _shard_experts_source(spec, plan: ParallelPlan, experts: int, where) -> list[str]:
    if _expert_tp_splits(plan):
        return _shard_experts_2d_source(plan, where)
    return shard_experts_source(_permuted(spec, plan, experts), plan.replicated_rows)


def _expert_tp_splits(plan: ParallelPlan) -> dict[str, int]:
    """Under tensor x expert parallelism: the experts' weight -> its dim split over tp (the same in every layer)."""
    if plan.experts is None or plan.tensor is None:
        return {}
    return {name.rsplit(".", 1)[1]: dim for name, dim in plan.tensor_splits if _is_expert(plan, name)}


def _is_expert(plan: ParallelPlan, name: str) -> bool:
    return name.rsplit(".", 1)[0] in plan.expert_modules


def _shard_experts_2d_source(plan: ParallelPlan, where) -> list[str]:
    """Megatron's layout: experts over ep (dim 0), each expert's hidden size over tp, as one 2-D DTensor."""
    splits = _expert_tp_splits(plan)
    axes = _in_mesh_order(plan, (plan.experts, plan.tensor))
    placements = ["Shard(0)" if axis == plan.experts else "Shard(EXPERT_TP_SPLITS[name])" for axis in axes]
    return [
        f"EXPERT_TP_SPLITS = {splits!r}  # each expert's hidden size split over {plan.tensor}  {where('sharding', 'tensor', 'column')}",
        "",
        "",
        "def shard_experts(module: torch.nn.Module, expert_mesh: DeviceMesh) -> None:",
        f'    """The [E, ...] expert weights become DTensors on the {" x ".join(axes)} mesh: sharded on dim 0 over {plan.experts}',
        f"    (each rank keeps E / {plan.experts} experts) and along each expert's hidden size over {plan.tensor} (Megatron's",
        f"    layout). model.py's f / g over {plan.tensor} wrap the all-to-all over {plan.experts} (moec.backends.torch.experts).\"\"\"",
        "    for name, param in list(module.named_parameters(recurse=False)):",
        f"        sharded = distribute_tensor(param.detach(), expert_mesh, [{', '.join(placements)}])",
        "        module.register_parameter(name, torch.nn.Parameter(sharded, requires_grad=param.requires_grad))",
    ]


def shard_experts_source(permuted: bool = False, replicated_rows: bool = False) -> list[str]:
    mark = (["        sharded.replicated_rows = True  # ep is not a batch axis: its ranks share the tokens (read by dispatch_experts)"]
            if replicated_rows else [])
    if not permuted:
        return [
            "def shard_experts(module: torch.nn.Module, ep_mesh: DeviceMesh) -> None:",
            '    """The [E, ...] expert weights become DTensors sharded on dim 0: each rank keeps E / ep of them."""',
            "    for name, param in list(module.named_parameters(recurse=False)):",
            "        sharded = torch.nn.Parameter(distribute_tensor(param.detach(), ep_mesh, [Shard(0)]), requires_grad=param.requires_grad)",
            *mark,
            "        module.register_parameter(name, sharded)",
        ] if mark else [
            "def shard_experts(module: torch.nn.Module, ep_mesh: DeviceMesh) -> None:",
            '    """The [E, ...] expert weights become DTensors sharded on dim 0: each rank keeps E / ep of them."""',
            "    for name, param in list(module.named_parameters(recurse=False)):",
            "        sharded = distribute_tensor(param.detach(), ep_mesh, [Shard(0)])",
            "        module.register_parameter(name, torch.nn.Parameter(sharded, requires_grad=param.requires_grad))",
        ]
    return [
        "def shard_experts(module: torch.nn.Module, ep_mesh: DeviceMesh) -> None:",
        '    """The [E, ...] expert weights, rows put in EXPERT_ORDER, become DTensors sharded on dim 0: each rank',
        "    keeps its experts of EXPERT_PLACEMENT. dispatch_experts sends a token to the ranks of its experts' rows, and",
        '    checkpoints store the experts in id order (moec.checkpoint.expert_order), so any placement resumes them."""',
        "    for name, param in list(module.named_parameters(recurse=False)):",
        "        assert param.shape[0] == len(EXPERT_ORDER), f'{name}: {param.shape[0]} experts, EXPERT_ORDER has {len(EXPERT_ORDER)}'",
        "        sharded = distribute_tensor(param.detach()[list(EXPERT_ORDER)], ep_mesh, [Shard(0)])",
        "        sharded = torch.nn.Parameter(sharded, requires_grad=param.requires_grad)",
        "        sharded.expert_order = EXPERT_ORDER  # read by dispatch_experts",
        *mark,
        "        module.register_parameter(name, sharded)",
        "    module.expert_order = EXPERT_ORDER  # read by checkpoints",
    ]


def support_names(plan: ParallelPlan) -> tuple[str, ...]:
    """What parallel.py imports from the build's model_support.py: moec's own tensor-parallel styles (torch has none
    for these) and the bucketed all-reduce of the gradients ``reduce_gradients`` averages itself."""
    styles = (("ExpertHiddenSplit",) if plan.tensor is not None and plan.experts is None
              and any(".experts." in name for name, _ in plan.tensor_splits) else ()) \
        + (("ReplicatedKvHead",) if plan.replicated_kv else ())
    reduces = (plan.experts is not None and not plan.expert_fsdp) or _tensor_without_fsdp(plan)
    return styles + (("all_reduce_flat",) if reduces else ()) + (("SequenceShards",) if plan.context else ())


def _support_imports(plan: ParallelPlan) -> list[str]:
    names = support_names(plan)
    return ["", f"from model_support import {', '.join(names)}  # this build's helpers"] \
        if names else []


def _placement_imports(plan: ParallelPlan) -> list[str]:
    """What parallel.py imports from torch.distributed.tensor."""
    names = ["Shard", "distribute_tensor"]
    if plan.mismatched_gradients:
        names.append("DTensor")
    if plan.mismatched_gradients or any(name == "embed.weight" for name, _ in plan.tensor_splits):
        names.append("Replicate")
    return sorted(names, key=lambda name: (name[0].islower(), name))  # classes, then functions


def _tensor_imports(spec, plan: ParallelPlan) -> list[str]:
    """torch's tensor-parallel plans."""
    if plan.tensor is None:
        return []
    styles = ["ColwiseParallel", "RowwiseParallel", "parallelize_module"]
    if plan.sequence_parallel:
        styles[2:2] = ["PrepareModuleInput", "PrepareModuleOutput", "SequenceParallel"]
    return [f"from torch.distributed.tensor.parallel import {', '.join(styles)}"]


def global_balance(spec) -> bool:
    """Some MoE layer sums its load-balance counts over the data-parallel ranks."""
    return any(moe.aux.load_balance_batch == "global" for moe in _moe_configs(spec))


def _sets_batch_group(spec, plan: ParallelPlan) -> bool:
    if plan.context:  # the cp ranks hold one micro-batch's tokens between them (codegen_moe.counted_over_group)
        return any(True for _ in _moe_configs(spec))
    return bool(plan.data_parallel) and global_balance(spec)


def _batch_group_lines(spec, plan: ParallelPlan, where) -> list[str]:
    if not _sets_batch_group(spec, plan):
        return []
    if plan.context and not global_balance(spec):
        return [f"    use_batch_group(model, mesh[{plan.context!r}].get_group())  # MoE expert counts summed over "
                f"{plan.context}: one micro-batch's tokens  {where('sharding', 'sequence')}"]
    axes = plan.gradient_axes if plan.context else _in_mesh_order(plan, plan.data_parallel)
    return [f"    use_batch_group(model, {_flat(axes)}.get_group())  # aux.load_balance_batch 'global': "
            f"expert counts summed over {' x '.join(axes)}  {where('sharding', 'batch')}"]


def _context_lines(plan: ParallelPlan, where) -> list[str]:
    if not plan.context:
        return []
    return [f"    use_context_parallel(model, mesh[{plan.context!r}].get_group())  # attention gathers keys and values, "
            f"spectral MoE layers all-to-all the rfft over {plan.context}  {where('sharding', 'sequence')}"]


def use_context_parallel_source() -> list[str]:
    return [
        "def use_context_parallel(model: torch.nn.Module, group: dist.ProcessGroup) -> None:",
        "    \"\"\"The layers see the whole sequence: attention with RoPE at this rank's global positions, keys and values",
        "    all-gathered over ``group`` (autograd-aware: the backward reduce-scatters), a mask by global position; a spectral",
        "    MoE's rfft through all-to-alls over ``group`` (sequence -> channels -> bins and back); the last position from rank 0.\"\"\"",
        "    shards = SequenceShards(group)",
        "    for layer in model.modules():",
        "        if hasattr(layer, 'context'):",
        "            layer.context = shards",
    ]


def _apply_context(plan: ParallelPlan, blocks: int, where) -> list[str]:
    """Data parallelism over the batch axes x cp: the cp ranks' gradients are of other tokens, so they are averaged
    too (torchtitan's dp_shard_cp); every rank's loss is a mean over as many tokens, so the average is one process's."""
    axes = plan.gradient_axes
    if plan.experts is not None:  # no DDP (see _apply): reduce_gradients averages over the batch axes x cp
        return _shard_experts_lines(plan, where)
    if not plan.shard:
        return [
            f"    dp_mesh = {_flat(axes)}  # replicate over {' x '.join(axes)}: cp ranks are data ranks for the gradients",
            f"    replicate(model, device_mesh=dp_mesh)  # DDP: gradients all-reduced, averaged  {where('sharding', 'sequence')}",
        ]
    return [
        f"    policy = MixedPrecisionPolicy(param_dtype={plan.param_dtype}, reduce_dtype={plan.reduce_dtype})  "
        f"{where('schedule', 'precision')}",
        f"    dp_mesh = {_flat(axes)}  # FSDP over {' x '.join(axes)}: cp ranks are data ranks for the gradients",
        f"    for block in model.blocks:  # blocks.0 .. blocks.{blocks - 1}, one unit each",
        f"        fully_shard(block, mesh=dp_mesh, mp_policy=policy)  {where('sharding', 'fsdp')}",
        "    fully_shard(model, mesh=dp_mesh, mp_policy=policy)  # the root: embeddings, final norm, head",
    ]


def use_batch_group_source() -> list[str]:
    return [
        "def use_batch_group(model: torch.nn.Module, group: dist.ProcessGroup) -> None:",
        '    """The MoE layers that sum their expert counts over the whole batch (aux.load_balance_batch \'global\') sum',
        '    them over ``group``, the data-parallel ranks."""',
        "    for layer in model.modules():",
        "        if hasattr(layer, 'batch_group'):",
        "            layer.batch_group = group",
    ]


def _flat(axes: tuple[str, ...]) -> str:
    return f"mesh[{axes[0]!r}]" if len(axes) == 1 else f"mesh[{axes!r}]._flatten({'_'.join(axes)!r})"


def _locator(spec):
    """``where(*path)``: ``# specs/x.yaml:12 mesh.axes`` for a spec path, as model.py's comments."""
    source = getattr(spec, "source", None)

    def where(*path) -> str:
        found = source.locate(path) if source is not None else None
        label = ".".join(path)
        return f"# {source.file}:{found[0]} {label}" if found else f"# {label}"

    return where
