"""Per-op expressions of the torch backend for the dense (unfused) ops.

Each entry maps ``(node, *argument_expressions)`` to one Python expression. Attribute
values are numbers and booleans from the graph, written with ``repr``.
"""

from __future__ import annotations


def _width(node) -> int:
    return node.types[0].shape[-1]


def _padding(node) -> str:
    index = node.attr.get("padding_idx")
    return "" if index is None else f", padding_idx={index!r}"


def _rope(node, x: str, positions: str | None) -> str:
    """``rope(x, heads, head_dim, theta[, positions])`` or ``rope_yarn(...)``; DeepSeek's interleaved pairs and mscale as keywords."""
    a = node.attr
    args = [x, str(a["heads"]), str(a["head_dim"]), repr(a["theta"])]
    if "factor" in a:
        args += [repr(a[key]) for key in ("factor", "original", "beta_fast", "beta_slow", "truncate")]
    args += [positions] if positions else []
    args += ["interleaved=True"] if a.get("interleave") else []
    args += [f"scale={a['scale']!r}"] if "scale" in a else []
    args += [f"rotary_dim={a['rotary_dim']}"] if "rotary_dim" in a else []
    return f"{'rope_yarn' if 'factor' in a else 'rope'}({', '.join(args)})"


EXPRESSIONS = {
    "embed": lambda n, tokens, table: f"F.embedding({tokens}, {table}{_padding(n)})",
    "linear": lambda n, x, w, b=None: f"F.linear({x}, {w}{', ' + b if b else ''})",
    "pos_embed": lambda n, x, table: f"{x} + {table}[: {x}.shape[1]]",
    "rmsnorm": lambda n, x, w: f"F.rms_norm({x}, ({_width(n)},), {w}, {n.attr['eps']!r})",
    "head_rmsnorm": lambda n, x, w: (f"F.rms_norm({x}.unflatten(-1, ({n.attr['heads']}, -1)), ({_width(n) // n.attr['heads']},), "
                                     f"{w}, {n.attr['eps']!r}).flatten(-2)"),
    "sigmoid_gate": lambda n, x, g: f"{x} * torch.sigmoid({g})",
    "load_balance_pooled": lambda n, stats: (f"{n.attr['weight']!r} * {n.attr['experts']} * torch.sum({stats}[0] / {n.attr['layers']} "
                                            f"* ({stats}[1] / {n.attr['layers']}))"),
    "layernorm": lambda n, x, w, b: f"F.layer_norm({x}, ({_width(n)},), {w}, {b}, {n.attr['eps']!r})",
    "rope": lambda n, x, positions=None: _rope(n, x, positions),
    "split": lambda n, x: (f"{x}.split({list(n.attr['sizes'])!r}, dim=-1)" if n.attr["heads"] == 1 else
                           f"split_heads({x}, {n.attr['heads']}, {tuple(n.attr['sizes'])!r})"),
    # fn: mla_attention (torch SDPA) or mla_attention_eager (kernels.attention: eager); positions: decoding
    "mla_attention": lambda n, *args, fn="mla_attention", positions=None: (
        f"{fn}({', '.join(args)}, {n.attr['heads']}, {n.attr['scale']!r}{', ' + positions if positions else ''})"),
    # fn: the snippet chosen by kernels.attention (attention = torch SDPA, attention_eager = written out)
    "attention": lambda n, q, k, v, fn="attention": f"{fn}({q}, {k}, {v}, {n.attr['heads']}, {n.attr['kv_heads']}, {n.attr['head_dim']}, {n.attr['causal']})",
    "activation": lambda n, x: f"F.{n.attr['fn']}({x})",
    "glu": lambda n, gate, up: f"F.{n.attr['fn']}({gate}) * {up}",
    "clamped_glu": lambda n, gate, up: f"clamped_glu({gate}, {up}, {n.attr['limit']!r}, {n.attr['alpha']!r})",
    "add": lambda n, x, y: f"{x} + {y}",
    "select_last": lambda n, x: f"{x}[:, -1:, :]",
    "shift_tokens": lambda n, x: f"F.pad({x}[:, {n.attr['steps']}:], (0, {n.attr['steps']}))",
    "concat": lambda n, a, c: f"torch.cat([{a}, {c}], dim=-1)",
    "dynamics": lambda n, h, *rest: (f"inl_dynamics({h}, {rest[0] if len(rest) == 6 else 'None'}, {', '.join(rest[-5:])}, "
                                     f"{n.attr['dt']!r}, {n.attr['beta_max']!r}, {n.attr['velocity_limit']!r})"),
}
