"""``schedule.precision.compute: fp8``: the projections' GEMMs in fp8, the way torchtitan trains on H100.

The generated ``parallel.py`` gets ``float8_training(model, emulate)``: torchao's
``convert_to_float8_training`` with ``Float8LinearConfig.from_recipe_name("rowwise")`` (dynamic
rowwise e4m3 scales, rounded to powers of two, for inputs, weights and gradients) over the
``nn.Linear`` projections that the graph's ``linear`` nodes name. The trainer applies it right after
building the model, before activation checkpointing, ``torch.compile`` and ``fully_shard``
(torchtitan's order: model converters, then parallelize). The master weights stay in
``precision.params``; everything outside these GEMMs runs in bf16 autocast.

What stays bf16, named in ``FLOAT8_KEPT``: the output head (logits; torchtitan's default filter
skips ``output`` too), projections with a width that is not a multiple of 16 (``torch._scaled_mm``'s
rule), and everything that is not a ``linear`` node: routers and the routed and shared experts.
torchao 0.18's fp8 grouped GEMM (``torchao.prototype.moe_training``) needs CUDA sm90 kernels, has no
CPU emulation for its rowwise recipe and wants every expert's token group padded to a multiple of 16,
which moec's dispatch does not do yet: the experts' grouped GEMMs run in bf16.

``enable_fsdp_float8_all_gather`` stays off: torchao gathers fp8 weights for tensorwise scales only;
with rowwise scales FSDP2 gathers the bf16 weights (``MixedPrecisionPolicy``) and each GEMM casts them.
"""

from __future__ import annotations

from dataclasses import dataclass

from moec.dtypes import FP8_MULTIPLE

HEAD = "head"


@dataclass(frozen=True)
class Float8Linears:
    converted: tuple[str, ...]  # module roles (fqn without block numbers) whose GEMMs run in fp8
    kept: tuple[tuple[str, str], ...]  # (role, why it stays bf16)


def module_role(fqn: str) -> str:
    """``blocks.3.attention.wq`` -> ``blocks.attention.wq``: one name for a projection in every block."""
    return ".".join(part for part in fqn.split(".") if not part.isdigit())


def float8_linears(graph) -> Float8Linears:
    """Which of the graph's ``linear`` projections fp8 converts, by role, and why the others stay bf16."""
    widths: dict[str, set[tuple[int, int]]] = {}
    for node in graph.nodes:
        if node.op == "linear":
            weight = graph[node.inputs[1].node]
            fqn = weight.attr["name"].removesuffix(".weight")
            widths.setdefault(module_role(fqn), set()).add(tuple(weight.type.shape))  # (out, in)
    converted, kept = [], []
    for role, shapes in widths.items():
        narrow = sorted((out, inp) for out, inp in shapes if out % FP8_MULTIPLE or inp % FP8_MULTIPLE)
        if role == HEAD:
            kept.append((role, "the output head: logits stay bf16 (torchtitan's default)"))
        elif narrow:
            out, inp = narrow[0]
            kept.append((role, f"{inp} -> {out} features, not both multiples of {FP8_MULTIPLE}"))
        else:
            converted.append(role)
    return Float8Linears(tuple(converted), tuple(kept))


def float8_source(linears: Float8Linears, where) -> list[str]:
    """The lines of ``parallel.py`` that convert the projections; [] when compute is not fp8."""
    kept = "".join(f"\n    {role!r}: {why!r}," for role, why in linears.kept)
    return [
        f"{where('schedule', 'precision', 'compute')}: fp8",
        "# the projections whose GEMMs run in fp8, by role (block numbers dropped); routers and experts stay bf16",
        f"FLOAT8_LINEARS = {linears.converted!r}",
        f"FLOAT8_KEPT = {{{kept}\n}}  # projections that stay bf16" if kept else "FLOAT8_KEPT = {}  # every projection is fp8",
        "",
        "",
        "def float8_training(model: torch.nn.Module, emulate: bool) -> torch.nn.Module:",
        '    """FLOAT8_LINEARS become torchao Float8Linear: dynamic rowwise e4m3 scales for input, weight and gradient,',
        "    fp8 GEMMs (torchtitan's H100 recipe); the master weights keep their dtype. Called before activation",
        "    checkpointing, torch.compile and fully_shard. emulate (the CPU): the same casts, high-precision GEMMs.",
        '    enable_fsdp_float8_all_gather stays off: torchao gathers fp8 weights for tensorwise scales only."""',
        "    from torchao.float8 import Float8LinearConfig, convert_to_float8_training",
        "",
        '    config = dataclasses.replace(Float8LinearConfig.from_recipe_name("rowwise"), emulate=emulate)',
        "    return convert_to_float8_training(model, config=config, module_filter_fn=is_float8_linear)",
        "",
        "",
        "def is_float8_linear(module: torch.nn.Module, fqn: str) -> bool:",
        '    return ".".join(part for part in fqn.split(".") if not part.isdigit()) in FLOAT8_LINEARS',
        "",
        "",
    ]
