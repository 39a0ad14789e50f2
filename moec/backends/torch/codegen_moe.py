"""Source of the fused ``moe`` functions in a generated program (the ``spectral_moe`` function around them: ``codegen_spectral``).

Each function is built from lines chosen by the node's ``MoeAttrs`` and the kernel:

- ``grouped_mm`` (dropless default): (token, choice) rows sorted by expert with a stable
  argsort, one grouped GEMM per projection over the expert groups (a gated expert's gate and
  up in one, from ``experts_w_gate_up``), put back by index_copy.
- ``bmm`` (capacity default): each expert's C best slots gathered into [E, C, D], batched
  GEMMs, results put back by slot index (each slot is written once).
- ``eager``: every expert on every token ([E, N, D] bmm), outputs gathered per choice.
- ``triton``: moec's Triton kernels (``moec.backends.triton``, lines from ``codegen_triton``):
  fused router, sort-free permutation, the first projection gathering token rows inside the
  kernel with the activation in its epilogue, the down projection, a weighted combine; with
  capacity, dropped choices sort after every kept one and are never computed.

The router's score line and the activation come from the registries in ``moec.moe``. No
``.item()``, ``.tolist()`` or data-dependent Python control flow: counts and offsets stay
tensors, so expert loads change each step without recompiling. Combine sums the k choices
in order (deterministic; no atomic scatter-add).
"""

from __future__ import annotations

import dataclasses
import re

from moec.backends.torch import codegen_triton
from moec.moe import ACTIVATIONS, ROUTERS, SELECTION_BIAS, MoeAttrs
from moec.moe.decompose import ROUTER_NORM_EPS
from moec.moe.params import ROUTER_BIAS

KERNELS = ("grouped_mm", "bmm", "eager", "triton")


def slot_arg(slot: str) -> str:
    """``router.weight`` -> ``router_weight``: a slot's parameter name in the function."""
    return slot.replace(".", "_")


def choose_kernel(requested: str, moe: MoeAttrs, expert_parallel: bool = False, measured: dict | None = None) -> str:
    """``auto``: the measured choice for this layer (``measured``: MoeAttrs -> kernel, moec.bench.kernel_choice),
    else the fixed rule: bmm for capacity, grouped_mm for dropless (and under expert parallelism).

    The schema refuses what cannot serve a spec; the parallel plan what cannot run distributed.
    """
    if requested == "auto" and expert_parallel:
        return "grouped_mm"
    if requested == "auto" and measured and moe in measured:
        requested = measured[moe]
    elif requested == "auto":
        return "grouped_mm" if moe.dropless else "bmm"
    assert requested in KERNELS and not (requested == "bmm" and moe.dropless), f"kernel {requested} reached the backend"
    return requested


def uses_triton(kernel: str) -> bool:
    return kernel == "triton"


def moe_function(name: str, slots: tuple[str, ...], moe: MoeAttrs, kernel: str, expert_parallel: bool = False,
                 tiles: tuple[int, ...] = (), tensor_parallel: bool = False) -> list[str]:
    """``tensor_parallel``: the experts' weights are this rank's slices of the expert hidden size (grouped_mm only)."""
    args = ", ".join(slot_arg(s) for s in slots)
    E, k = moe.experts, moe.choices
    size = f"{moe.capacity.tokens} tokens" if moe.capacity.tokens else moe.capacity.factor
    policy = f"capacity {size} ({moe.capacity.drop_policy})" if not moe.dropless else "dropless"
    picks = f"each expert picks from all {E}" if ROUTERS[moe.router.kind].expert_choice else f"top-{moe.top_k} of {E} experts"
    lines = [
        f"def {name}({args}, training: bool):",
        f'    """{moe.router.kind} router, {picks}, {policy}, {moe.expert.activation} experts via {kernel}{" across the expert-parallel group" if expert_parallel else ""}."""',
        "    batch, seq, width = h.shape",
        "    tokens = batch * seq",
        "    x = h.reshape(tokens, width)  # (N, D)",
    ]
    triton = kernel == "triton" and not expert_parallel
    fused_router = triton and codegen_triton.fuses_router(moe)
    lines.append(_phase("router"))
    if ROUTERS[moe.router.kind].learned:
        lines.append(f"    logits = F.linear({_router_input(moe)}, router_weight{', router_bias' if ROUTER_BIAS in slots else ''})  # (N, E)")
        lines += _router(moe, SELECTION_BIAS in slots, fused_router, tiles)
    else:
        lines += _fixed_router(moe)
    lines += [
        _phase("permute"),
        "    flat_expert = chosen.reshape(-1)  # (N*k,) the expert of each (token, choice)",
        codegen_triton.counts_line() if fused_router else
        f"    counts = torch.zeros({E}, dtype=torch.int64, device=h.device).scatter_add_(0, flat_expert, torch.ones_like(flat_expert))",
    ]
    if not moe.dropless:
        lines += _capacity(moe)
    if expert_parallel:
        lines += _expert_parallel(moe, tensor_parallel)
    elif triton:
        lines += _triton(moe, tiles, fused_router)
    elif tensor_parallel:
        assert kernel == "grouped_mm" and not moe.expert.bias, "validation admits only bias-free grouped_mm experts under tp"
        lines += _tensor_parallel_ends(_grouped(moe))
    else:
        lines += {"grouped_mm": _grouped, "bmm": _bmm, "eager": _dense}[kernel](moe)
    if triton:
        lines += [_phase("combine"), codegen_triton.combine_line(tiles)]
    elif not expert_parallel:  # dispatch_experts combines on the experts' ranks
        lines.append("    out = weights[:, 0, None] * y[:, 0]  # combine: choices summed in order")
        lines += [f"    out = out + weights[:, {j}, None] * y[:, {j}]" for j in range(1, k)]
    lines.append(_phase(None))
    if moe.capacity.fallback_weight:
        lines += _fallback(moe)
    if moe.shared:
        lines += _ffn("x", "shared_", moe.expert.activation, "shared", out="shared_out", clamp=moe.expert.clamp)
        if moe.shared_gate:
            lines.append("    shared_out = shared_out * torch.sigmoid(F.linear(x, shared_gate_weight))  # (N, 1) gate")
        lines.append("    out = out + shared_out  # shared experts see every token")
    lines += _aux(moe)
    lines += _stats(moe)
    if moe.aux.pooled:
        lines += [
            "    # aux.load_balance_scope 'model': the layer's share of the pooled loss, summed over layers by the model",
            *_pooled_stats(moe),
            "    return out.view(batch, seq, width), aux, balance_stats, stats",
        ]
    else:
        lines.append("    return out.view(batch, seq, width), aux, stats")
    return with_batch_group(with_phases(lines))


PHASE_MARK = "#phase "  # a line of its own, between moe_function's builders and with_phases


def _phase(name: str | None) -> str:
    """A marker: the lines after it, up to the next marker, run in the profiler range ``moe.<name>`` (None: in none)."""
    return PHASE_MARK + (name or "")


def with_phases(lines: list[str]) -> list[str]:
    """Markers -> ``with phase("moe.<name>"):`` blocks (moec.backends.torch.phases) holding the lines up to the next
    marker; a phase without lines is left out."""
    out, current, opened = [], None, False
    for line in lines:
        if line.startswith(PHASE_MARK):
            current, opened = line[len(PHASE_MARK):] or None, False
        elif current is None:
            out.append(line)
        else:
            if not opened:
                out.append(f'    with phase("moe.{current}"):')
                opened = True
            out.append("    " + line)
    return out


def counted_over_group(moe: MoeAttrs) -> MoeAttrs:
    """Under context parallelism the ranks of a cp group hold one micro-batch's tokens between them: the layer sums its
    expert counts over ``batch_group`` (the cp group, or dp x cp for aux.load_balance_batch 'global'; parallel.py sets
    it) as the global load balance does over the data-parallel ranks, so the loss is one process's."""
    return dataclasses.replace(moe, aux=dataclasses.replace(moe.aux, load_balance_batch="global"))


def uses_batch_group(lines: list[str]) -> bool:
    """The function body sums expert counts over the data-parallel group (aux.load_balance_batch 'global')."""
    return any(re.search(r"\bbatch_group\b", line.partition("  # ")[0]) for line in lines[2:])


def with_batch_group(lines: list[str]) -> list[str]:
    """``batch_group`` (None: one process) after ``training`` in the signature when the body reads it."""
    if not uses_batch_group(lines):
        return lines
    return [lines[0].replace(", training: bool", ", training: bool, batch_group=None", 1), *lines[1:]]


def _router_input(moe: MoeAttrs) -> str:
    """The router's (N, D) input, through router.norm when set."""
    x = "router_in.reshape(tokens, -1)"
    if moe.router.norm == "rmsnorm":
        return f"F.rms_norm({x}, (router_in.shape[-1],), router_norm_weight, {ROUTER_NORM_EPS!r})"
    if moe.router.norm == "layernorm":
        return f"F.layer_norm({x}, (router_in.shape[-1],), router_norm_weight, router_norm_bias, {ROUTER_NORM_EPS!r})"
    return x


def _fallback(moe: MoeAttrs) -> list[str]:
    """capacity.fallback 'dense': a dense FFN for the tokens every expert dropped (computed for all, kept for those)."""
    bias = "fallback_b_" if moe.expert.bias else ""
    lines = _ffn("x", "fallback_", moe.expert.activation, "fallback", out="fallback_out", bias=bias, clamp=moe.expert.clamp)
    return lines + [
        f"    all_dropped = ~kept.view(tokens, {moe.choices}).any(-1, keepdim=True)  # (N, 1)",
        f"    out = out + {moe.capacity.fallback_weight!r} * fallback_out * all_dropped",
    ]


def _stats(moe: MoeAttrs) -> list[str]:
    """Detached health numbers for the trainer (``MoeStats``): counts, dropped share, router entropy, aux terms."""
    dropped = "1.0 - kept.float().mean()  # the share of routed choices capacity dropped" if not moe.dropless else \
        "logits.new_zeros(())  # dropless: none"
    fields = "counts, dropped, router_entropy(scores), balance, z"
    rewards = (("entropy_loss", moe.aux.entropy), ("margin_loss", moe.aux.margin))
    if any(weight > 0 for _, weight in rewards):  # both reward fields, 0 for the one not set
        fields += "".join(f", {name if weight > 0 else 'logits.new_zeros(())'}" for name, weight in rewards)
    return [f"    dropped = {dropped}", f"    stats = MoeStats({fields}).detached(logits.dtype)"]


def _fixed_router(moe: MoeAttrs) -> list[str]:
    """A router without weights (token_id): one-hot scores from the token ids in router_in."""
    scores = ROUTERS[moe.router.kind].emit_scores(moe.router, f"router_in.reshape(tokens), {moe.experts}")
    return [
        f"    scores = {scores}  # (N, E) one-hot: each token id's expert",
        "    logits = scores  # no learned router: the scores stand in for the logits (z loss, statistics)",
        f"    weights, chosen = select_experts(scores, {moe.choices})  # (N, 1) weight 1",
    ]


def _router(moe: MoeAttrs, selection_bias: bool, fused: bool = False, tiles: tuple[int, ...] = ()) -> list[str]:
    router = moe.router
    logits = "logits"
    lines = []
    anneal = moe.anneal
    if router.noise != "none":
        std = "router_anneal[1]" if anneal and anneal.noise_std else repr(router.noise_std)
        lines.append(f"    noisy = router_noise(logits, {router.noise!r}, {std}, training)")
        logits = "noisy"
    if router.bands:
        lines.append(f"    banded = band_mask({logits}.view(batch, seq, -1), {router.bands}).view(tokens, -1)  # each bin's group of experts only")
        logits = "banded"
    if anneal and anneal.temperature:
        lines.append(f"    tempered = {logits} / router_anneal[0]  # router.temperature annealed")
        logits = "tempered"
    if fused:  # one Triton kernel, renormalising too unless router dropout comes between
        lines += codegen_triton.router_lines(moe, logits, selection_bias, tiles)
    else:
        lines += [f"    scores = {ROUTERS[router.kind].emit_scores(router, logits)}  # (N, E)", _select(moe, selection_bias)]
    if router.dropout > 0:
        lines.append(f"    weights = router_dropout(weights, {router.dropout!r}, training)  # the best choice dropped for some tokens")
    if router.normalize and not (fused and router.dropout == 0):
        lines.append("    weights = weights / weights.sum(-1, keepdim=True)")
    if router.scale != 1.0:
        lines.append(f"    weights = weights * {router.scale!r}  # router.scale, after renormalisation")
    return lines


def _select(moe: MoeAttrs, selection_bias: bool) -> str:
    bias = ", router_selection_bias" if selection_bias else ""
    router = moe.router
    if router.groups == 1:
        return f"    weights, chosen = select_experts(scores, {moe.choices}{bias})  # (N, k)"
    return (f"    weights, chosen = select_grouped_experts(scores, {moe.choices}, {router.groups}, {router.top_groups}{bias})"
            f"  # (N, k) from each token's {router.top_groups} best of {router.groups} expert groups")


def _capacity(moe: MoeAttrs) -> list[str]:
    E, cap = moe.experts, moe.capacity
    if cap.tokens:
        size = f"    capacity = {cap.tokens}  # capacity.tokens: C slots per expert, whatever the batch"
    else:
        size = f"    capacity = capacity_of(tokens, {cap.factor!r}, {moe.top_k}, {E})  # C = floor(factor * N * top_k / E)"
    lines = [
        size,
        "    choice_scores = scores.gather(-1, chosen).reshape(-1)",
        f"    slots, kept = capacity_keep(choice_scores, flat_expert, {E}, capacity)  # (E, C), (N*k,)",
    ]
    if moe.anneal and moe.anneal.capacity_factor:
        lines += [
            f"    limit = annealed_capacity(router_anneal[2], tokens, {moe.top_k}, {E})  # capacity.factor annealed; C above is its peak",
            f"    slots, kept = capacity_trim(slots, limit, tokens * {moe.choices})",
        ]
    lines += [
        f"    weights = weights * kept.view(tokens, {moe.choices})",
    ]
    if cap.drop_policy == "renormalize":
        lines.append("    weights = renormalize_kept(weights)")
    return lines


def _ffn(rows: str, prefix: str, activation: str, param: str, out: str, gemm=None, bias: str = "", clamp: dict | None = None,
         fused: bool = False) -> list[str]:
    """Lines computing ``out = down(act(...up(rows)))`` with the given GEMM wrapper. ``fused`` (the routed experts):
    a gated FFN's gate and up come from one GEMM with ``{param}_w_gate_up`` [E, 2, H, D] seen as [E, 2H, D]."""
    kind = ACTIVATIONS[activation]
    gemm = gemm or (lambda a, w: f"F.linear({a}, {w})")
    if kind.gated and fused:
        lines = [f"    {prefix}gate_up = {gemm(rows, f'{param}_w_gate_up.flatten(1, 2)')}{bias and f' + {bias}gate_up'}"
                 "  # one GEMM for both halves",
                 f"    {prefix}gate, {prefix}up = {prefix}gate_up.chunk(2, dim=-1)"]
    else:
        lines = [f"    {prefix}up = {gemm(rows, f'{param}_w_up')}{bias and f' + {bias}up'}"]
        if kind.gated:
            lines.append(f"    {prefix}gate = {gemm(rows, f'{param}_w_gate')}{bias and f' + {bias}gate'}")
    if kind.clamped:
        lines.append(f"    {prefix}hidden = clamped_glu({prefix}gate, {prefix}up, {clamp['limit']!r}, {clamp['alpha']!r})")
    elif kind.gated:
        lines.append(f"    {prefix}hidden = F.{kind.fn}({prefix}gate) * {prefix}up")
    else:
        lines.append(f"    {prefix}hidden = F.{kind.fn}({prefix}up)")
    lines.append(f"    {out} = {gemm(f'{prefix}hidden', f'{param}_w_down')}{bias and f' + {bias}down'}")
    return lines


def _bias_parts(moe: MoeAttrs) -> list[str]:
    """The routed experts' biases, each [E, out] after ``flatten(1)`` (b_gate_up [E, 2, H] -> [E, 2H])."""
    return (["gate_up"] if ACTIVATIONS[moe.expert.activation].gated else ["up"]) + ["down"]


def _bias_rows(part: str) -> str:
    return f"experts_b_{part}.flatten(1)" if part == "gate_up" else f"experts_b_{part}"


def up_weight(moe: MoeAttrs) -> str:
    """The routed experts' first weight: ``experts_w_gate_up`` when gated, else ``experts_w_up``."""
    return "experts_w_gate_up" if ACTIVATIONS[moe.expert.activation].gated else "experts_w_up"


# Rows back to (token, choice) order by writing each to its slot (no second argsort; each row once).
_UNSORT = "torch.empty_like(y_sorted).index_copy(0, order, y_sorted)"


def _grouped(moe: MoeAttrs) -> list[str]:
    k = moe.choices
    lines = [
        "    order = torch.argsort(flat_expert, stable=True)  # sort-by-expert permutation",
        "    offsets = torch.cumsum(counts, 0).to(torch.int32)  # end row of each expert's group",
        f"    rows = x[order // {k}]  # (N*k, D) token rows in expert order",
    ]
    bias = ""
    if moe.expert.bias:
        lines += ["    row_expert = flat_expert[order]"] + [f"    bias_{p} = {_bias_rows(p)}[row_expert]" for p in _bias_parts(moe)]
        bias = "bias_"
    lines.append(_phase("experts"))
    lines += _ffn("rows", "", moe.expert.activation, "experts", "y_sorted",
                  lambda a, w: f"grouped_linear({a}, {w}, offsets)", bias, moe.expert.clamp, fused=True)
    lines += [_phase("combine"), f"    y = {_UNSORT}.view(tokens, {k}, width)  # back to (token, choice)"]
    return lines


def _tensor_parallel_ends(lines: list[str]) -> list[str]:
    """The grouped path on this rank's slice of every expert's hidden size (its ``local`` slices): Megatron's f on
    the routed rows, g on the experts' outputs, so the router's weights combine whole outputs (their gradient
    stays whole)."""
    lines = [_EXPERT_WEIGHT.sub(lambda m: f"local({m.group(0)})", line) for line in lines]
    rows = next(i for i, line in enumerate(lines) if line.startswith("    rows = "))
    # f on (N, D), not the k-fold rows
    first = "experts_w_gate_up" if any("experts_w_gate_up" in line for line in lines) else "experts_w_up"
    lines[rows] = lines[rows].replace("    rows = x[", f"    rows = copy_to_shards(x, {first})[")
    down = next(i for i, line in enumerate(lines) if line.startswith("    y_sorted = "))
    lines.insert(down + 1, "    y_sorted = sum_over_shards(y_sorted, experts_w_down)  # g: partial sums over the expert hidden slices")
    return lines


_EXPERT_WEIGHT = re.compile(r"(?<![\w.])experts_[wb]_(gate_up|up|gate|down)\b")


def _triton(moe: MoeAttrs, tiles: tuple[int, ...], fused_router: bool) -> list[str]:
    return [*codegen_triton.permutation_lines(moe, fused_router, tiles), _phase("experts"), *codegen_triton.ffn_lines(moe, tiles)]


def _expert_parallel(moe: MoeAttrs, tensor_parallel: bool = False) -> list[str]:
    """The experts across the expert-parallel group (moec.backends.torch.experts), combined there: one row per
    (token, rank holding its experts). Under tp too, Megatron's f on the tokens (dispatch_experts applies g)."""
    kind = ACTIVATIONS[moe.expert.activation]
    extra = ""
    if moe.expert.bias:
        extra += ", biases=({}, experts_b_down)".format("experts_b_gate_up" if kind.gated else "experts_b_up")
    if kind.clamped:
        extra += f", clamp=({moe.expert.clamp['limit']!r}, {moe.expert.clamp['alpha']!r})"
    fn = "clamped_glu" if kind.clamped else kind.fn
    first = up_weight(moe)
    x = f"copy_to_shards(x, {first})" if tensor_parallel else "x"
    return [
        _phase(None),  # dispatch_experts names its own phases: the all-to-alls and the local experts
        f"    out = dispatch_experts({x}, chosen, weights, {first}, experts_w_down, {fn!r}{extra})"
        "  # a token travels once to each rank of its experts, combined there (experts.py)",
    ]


def _bmm(moe: MoeAttrs) -> list[str]:
    k = moe.choices
    lines = [
        f"    present = (slots < tokens * {k}).unsqueeze(-1)  # (E, C, 1) false on unused capacity",
        f"    rows = x[slots.clamp_max(tokens * {k} - 1) // {k}] * present  # (E, C, D)",
    ]
    bias = ""
    if moe.expert.bias:
        lines += [f"    bias_{p} = {_bias_rows(p)}[:, None, :]" for p in _bias_parts(moe)]
        bias = "bias_"
    lines.append(_phase("experts"))
    lines += _ffn("rows", "", moe.expert.activation, "experts", "y_ecd", lambda a, w: f"torch.bmm({a}, {w}.transpose(1, 2))", bias,
                  moe.expert.clamp, fused=True)
    lines += [
        _phase("combine"),
        f"    y = y_ecd.new_zeros(tokens * {k} + 1, width).index_put((slots.reshape(-1),), y_ecd.reshape(-1, width))  # y_ecd's dtype (autocast)",
        f"    y = y[:-1].view(tokens, {k}, width)  # each kept slot written once; the sentinel row dropped",
    ]
    return lines


def _dense(moe: MoeAttrs) -> list[str]:
    E = moe.experts
    lines = [f"    rows = x.unsqueeze(0).expand({E}, tokens, width)  # (E, N, D): every expert sees every token"]
    bias = ""
    if moe.expert.bias:
        lines += [f"    bias_{p} = {_bias_rows(p)}[:, None, :]" for p in _bias_parts(moe)]
        bias = "bias_"
    lines.append(_phase("experts"))
    lines += _ffn("rows", "", moe.expert.activation, "experts", "y_all", lambda a, w: f"torch.bmm({a}, {w}.transpose(1, 2))", bias,
                  moe.expert.clamp, fused=True)
    lines.append(_phase("combine"))
    lines.append("    y = y_all.permute(1, 0, 2).gather(1, chosen.unsqueeze(-1).expand(-1, -1, width))  # (N, k, D)")
    return lines


def _aux(moe: MoeAttrs) -> list[str]:
    zero = "logits.new_zeros(())"
    weights = moe.aux
    per_layer = weights.load_balance if not weights.pooled else 0.0  # pooled: the model computes it
    group = ", batch_group" if moe.aux.load_balance_batch == "global" else ""
    balance = f"{per_layer!r} * {_balance_fn(moe)}(scores, counts, {moe.experts}{group})" if per_layer > 0 else zero
    if per_layer > 0 and weights.per_sequence:  # aux.load_balance_scope 'sequence': each sequence's tokens, averaged
        balance = f"{per_layer!r} * sequence_load_balance_loss(scores, chosen, batch, {moe.experts})"
    z = f"{weights.z_loss!r} * torch.logsumexp(logits, dim=-1).pow(2).mean()" if weights.z_loss > 0 else zero
    rewards = [(name, weight) for name, weight in (("entropy_loss", weights.entropy), ("margin_loss", weights.margin)) if weight > 0]
    aux = " + ".join(name for name, weight in (("balance", per_layer), ("z", weights.z_loss), *rewards) if weight > 0)
    lines = [f"    balance = {balance}", f"    z = {z}"]
    lines += [f"    {name} = -{weight!r} * router_{name.removesuffix('_loss')}(scores)  # a reward" for name, weight in rewards]
    return lines + [f"    aux = {aux or zero}"]


def _balance_fn(moe: MoeAttrs) -> str:
    return "global_load_balance_loss" if moe.aux.load_balance_batch == "global" else "load_balance_loss"


def _pooled_stats(moe: MoeAttrs) -> list[str]:
    """[f_e, P_e] of the pooled loss, f_e over this rank's tokens or (aux.load_balance_batch 'global') every data-parallel rank's."""
    probs = "(scores / scores.sum(-1, keepdim=True)).mean(0)"
    if moe.aux.load_balance_batch != "global":
        return [f"    balance_stats = torch.stack([counts.to(scores.dtype) / tokens, {probs}])"]
    return ["    total, all_tokens = batch_counts(counts, batch_group, tokens)  # summed over the data-parallel ranks",
            f"    balance_stats = torch.stack([total.to(scores.dtype) / all_tokens, {probs}])"]


DFT_MAX_SEQ = 64  # kernels.spectral_moe 'auto': a DFT matmul up to this length, torch.fft above
