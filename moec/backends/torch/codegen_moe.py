"""Source of the fused ``moe`` and ``spectral_moe`` functions in a generated program.

Each function is built from lines chosen by the node's attributes and the kernel:

- ``grouped_mm`` (dropless default): (token, choice) rows sorted by expert with a stable
  argsort, one grouped GEMM per projection over the expert groups, unsorted by gather.
- ``bmm`` (capacity default): each expert's C best slots gathered into [E, C, D], batched
  GEMMs, results put back by slot index (each slot is written once).
- ``eager``: every expert on every token ([E, N, D] bmm), outputs gathered per choice.

No ``.item()``, ``.tolist()`` or data-dependent Python control flow: counts and offsets
stay tensors, so expert loads change each step without recompiling. Combine sums the k
choices in order (deterministic; no atomic scatter-add).
"""

from __future__ import annotations

GATED = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}


def slot_arg(slot: str) -> str:
    """``router.weight`` -> ``router_weight``: a slot's parameter name in the function."""
    return slot.replace(".", "_")


def choose_kernel(requested: str, attrs: dict) -> str:
    if requested == "auto":
        return "bmm" if attrs["capacity"] else "grouped_mm"
    if requested == "bmm" and not attrs["capacity"]:
        raise ValueError("kernels.moe 'bmm' pads experts to a fixed capacity; it needs capacity.mode 'capacity' (use grouped_mm for dropless)")
    if requested == "triton":
        raise ValueError("kernels.moe 'triton' has no implementation yet; use 'auto', 'grouped_mm', 'bmm' or 'eager'")
    return requested


def moe_function(name: str, attrs: dict, kernel: str) -> list[str]:
    slots = list(attrs["slots"])
    args = ", ".join(slot_arg(s) for s in slots)
    E, k = attrs["experts"], attrs["top_k"]
    policy = f"capacity {attrs['capacity_factor']} ({attrs['drop_policy']})" if attrs["capacity"] else "dropless"
    lines = [
        f"def {name}({args}, training: bool):",
        f'    """{attrs["router"]} router, top-{k} of {E} experts, {policy}, {attrs["activation"]} experts via {kernel}."""',
        "    batch, seq, width = h.shape",
        "    tokens = batch * seq",
        "    x = h.reshape(tokens, width)  # (N, D)",
        "    logits = F.linear(router_in.reshape(tokens, -1), router_weight)  # (N, E)",
    ]
    lines += _router(attrs)
    lines += [
        "    flat_expert = chosen.reshape(-1)  # (N*k,) the expert of each (token, choice)",
        f"    counts = torch.zeros({E}, dtype=torch.int64, device=h.device).scatter_add_(0, flat_expert, torch.ones_like(flat_expert))",
    ]
    if attrs["capacity"]:
        lines += _capacity(attrs)
    lines += {"grouped_mm": _grouped, "bmm": _bmm, "eager": _dense}[kernel](attrs)
    lines.append("    out = weights[:, 0, None] * y[:, 0]  # combine: choices summed in order")
    lines += [f"    out = out + weights[:, {j}, None] * y[:, {j}]" for j in range(1, k)]
    if attrs["shared"]:
        lines += _ffn("x", "shared_", attrs["activation"], "shared", out="shared_out")
        lines.append("    out = out + shared_out  # shared experts see every token")
    lines += _aux(attrs)
    lines += _stats(attrs)
    lines.append("    return out.view(batch, seq, width), aux, stats")
    return lines


def _stats(attrs: dict) -> list[str]:
    """Detached health numbers for the trainer: [tokens per expert..., dropped, entropy, lb, z]."""
    dropped = "1.0 - kept.float().mean()" if attrs["capacity"] else "logits.new_zeros(())"
    return [
        "    probs = scores / scores.sum(-1, keepdim=True)",
        "    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()",
        f"    terms = [{dropped}, entropy, balance, z]",
        "    stats = torch.cat([counts.to(logits.dtype), torch.stack(terms).to(logits.dtype)]).detach()",
    ]


def _router(attrs: dict) -> list[str]:
    lines, std = [], attrs["noise_std"]
    noisy = "logits" if attrs["noise"] == "none" else "noisy"
    if attrs["noise"] == "gaussian":
        lines.append(f"    noisy = logits + {std!r} * torch.randn_like(logits) if training else logits")
    elif attrs["noise"] == "gumbel":
        lines.append(f"    noisy = logits - {std!r} * torch.log(-torch.log(torch.rand_like(logits).clamp(1e-9, 1 - 1e-9))) if training else logits")
    temperature = attrs["temperature"]
    scores = {
        "topk": f"torch.softmax({noisy} / {temperature!r}, dim=-1)",
        "sigmoid_bias": f"torch.sigmoid({noisy} / {temperature!r})",
        "sinkhorn": f"sinkhorn({noisy}, {attrs['sinkhorn_iters']}, {attrs['sinkhorn_tau']!r}, {temperature!r})",
    }[attrs["router"]]
    bias = ", router_selection_bias" if "router.selection_bias" in attrs["slots"] else ""
    lines += [
        f"    scores = {scores}  # (N, E)",
        f"    weights, chosen = select_experts(scores, {attrs['top_k']}{bias})  # (N, k)",
    ]
    if attrs["normalize"]:
        lines.append("    weights = weights / weights.sum(-1, keepdim=True)")
    return lines


def _capacity(attrs: dict) -> list[str]:
    E, k = attrs["experts"], attrs["top_k"]
    lines = [
        f"    capacity = max(1, math.floor({attrs['capacity_factor']!r} * tokens * {k} / {E}))  # C = floor(factor * N * k / E)",
        "    choice_scores = scores.gather(-1, chosen).reshape(-1)",
        f"    slots, kept = capacity_keep(choice_scores, flat_expert, {E}, capacity)  # (E, C), (N*k,)",
        f"    weights = weights * kept.view(tokens, {k})",
    ]
    if attrs["drop_policy"] == "renormalize":
        lines += [
            "    total = weights.sum(-1, keepdim=True)",
            "    weights = torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), weights)",
        ]
    return lines


def _ffn(rows: str, prefix: str, activation: str, param: str, out: str, gemm=None, bias: str = "") -> list[str]:
    """Lines computing ``out = down(act(...up(rows)))`` with the given GEMM wrapper."""
    gemm = gemm or (lambda a, w: f"F.linear({a}, {w})")
    lines = [f"    {prefix}up = {gemm(rows, f'{param}_w_up')}{bias and f' + {bias}up'}"]
    if activation in GATED:
        lines.append(f"    {prefix}gate = {gemm(rows, f'{param}_w_gate')}")
        lines.append(f"    {prefix}hidden = F.{GATED[activation]}({prefix}gate) * {prefix}up")
    else:
        lines.append(f"    {prefix}hidden = F.{activation}({prefix}up)")
    lines.append(f"    {out} = {gemm(f'{prefix}hidden', f'{param}_w_down')}{bias and f' + {bias}down'}")
    return lines


def _grouped(attrs: dict) -> list[str]:
    k = attrs["top_k"]
    lines = [
        "    order = torch.argsort(flat_expert, stable=True)  # sort-by-expert permutation",
        "    offsets = torch.cumsum(counts, 0).to(torch.int32)  # end row of each expert's group",
        f"    rows = x[order // {k}]  # (N*k, D) token rows in expert order",
    ]
    bias = ""
    if attrs["bias"]:
        lines += ["    row_expert = flat_expert[order]", "    bias_up, bias_down = experts_b_up[row_expert], experts_b_down[row_expert]"]
        bias = "bias_"
    lines += _ffn("rows", "", attrs["activation"], "experts", "y_sorted", lambda a, w: f"runtime.grouped_mm({a}, {w}.transpose(1, 2), offsets)", bias)
    lines.append(f"    y = y_sorted[torch.argsort(order)].view(tokens, {k}, width)  # back to (token, choice)")
    return lines


def _bmm(attrs: dict) -> list[str]:
    k = attrs["top_k"]
    lines = [
        f"    present = (slots < tokens * {k}).unsqueeze(-1)  # (E, C, 1) false on unused capacity",
        f"    rows = x[slots.clamp_max(tokens * {k} - 1) // {k}] * present  # (E, C, D)",
    ]
    bias = ""
    if attrs["bias"]:
        lines.append("    bias_up, bias_down = experts_b_up[:, None, :], experts_b_down[:, None, :]")
        bias = "bias_"
    lines += _ffn("rows", "", attrs["activation"], "experts", "y_ecd", lambda a, w: f"torch.bmm({a}, {w}.transpose(1, 2))", bias)
    lines += [
        "    y = x.new_zeros(tokens * %d + 1, width).index_put((slots.reshape(-1),), y_ecd.reshape(-1, width))" % k,
        f"    y = y[:-1].view(tokens, {k}, width)  # each kept slot written once; the sentinel row dropped",
    ]
    return lines


def _dense(attrs: dict) -> list[str]:
    E = attrs["experts"]
    lines = [f"    rows = x.unsqueeze(0).expand({E}, tokens, width)  # (E, N, D): every expert sees every token"]
    bias = ""
    if attrs["bias"]:
        lines.append("    bias_up, bias_down = experts_b_up[:, None, :], experts_b_down[:, None, :]")
        bias = "bias_"
    lines += _ffn("rows", "", attrs["activation"], "experts", "y_all", lambda a, w: f"torch.bmm({a}, {w}.transpose(1, 2))", bias)
    lines.append("    y = y_all.permute(1, 0, 2).gather(1, chosen.unsqueeze(-1).expand(-1, -1, width))  # (N, k, D)")
    return lines


def _aux(attrs: dict) -> list[str]:
    zero = "logits.new_zeros(())"
    balance = f"{attrs['load_balance']!r} * load_balance_loss(scores, counts, {attrs['experts']})" if attrs["load_balance"] > 0 else zero
    z = f"{attrs['z_loss']!r} * torch.logsumexp(logits, dim=-1).pow(2).mean()" if attrs["z_loss"] > 0 else zero
    aux = " + ".join(name for name, weight in (("balance", attrs["load_balance"]), ("z", attrs["z_loss"])) if weight > 0)
    return [f"    balance = {balance}", f"    z = {z}", f"    aux = {aux or zero}"]


DFT_MAX_SEQ = 64  # kernels.spectral_moe 'auto': a DFT matmul up to this length, torch.fft above


def spectral_function(name: str, moe_name: str, attrs: dict, kernel: str) -> list[str]:
    slots = list(attrs["slots"])
    args = ", ".join(slot_arg(s) for s in slots)
    moe_args = ", ".join(slot_arg(s) for s in slots[1:] if s != "band.weight")
    norm = attrs["fft_norm"]
    use_dft = {"auto": f"seq <= {DFT_MAX_SEQ}", "dft": "True", "fft": "False"}[kernel]
    router_in = {"embedding": "z + band_weight[: z.shape[1]]", "index_feature": "band_index(z)", "none": "z"}[attrs["band"]]
    return [
        f"def {name}({args}, training: bool):",
        f'    """rfft over the sequence, {attrs["depth"]} x (z + moe(z)) with one set of weights, irfft."""',
        "    seq = x.shape[1]",
        f"    use_dft = {use_dft}  # DFT as matmuls for short sequences, else torch.fft",
        f"    z = rfft_real(x, {norm!r}, use_dft)  # (B, F, 2D): real parts, then imaginary parts",
        "    aux = stats = None",
        f"    for _ in range({attrs['depth']}):",
        f"        y, step_aux, step_stats = {moe_name}(z, {router_in}, {moe_args}, training)",
        "        z = z + y",
        "        aux = step_aux if aux is None else aux + step_aux",
        "        stats = step_stats if stats is None else stats + step_stats",
        f"    return irfft_real(z, seq, {norm!r}, use_dft), aux, stats / {attrs['depth']}  # stats: mean over steps",
    ]


def spectral_moe_attrs(attrs: dict) -> dict:
    """The attributes of the MoE inside a spectral node, as a ``moe`` node would have them."""
    inner = {key: value for key, value in attrs.items() if key not in ("depth", "fft_norm", "band")}
    rest = [slot for slot in attrs["slots"][1:] if slot != "band.weight"]
    inner["slots"] = ("h", "router_in", *rest)
    return inner
