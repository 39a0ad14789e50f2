"""The torch backend's emitter: fused graph -> the source of a readable ``model.py``.

The program is assembled from structured pieces — a header, sorted imports, helper
functions copied from ``snippets``, one function per distinct fused MoE configuration, and
one ``nn.Module`` class whose ``forward`` has one statement per graph node with its shape
and spec provenance. Nothing from the spec is pasted as code: names are checked
identifiers (the schema's ``LayerName``) and every other string goes in through ``repr``.
"""

from __future__ import annotations

import inspect
import re

from moec.backends.torch import codegen_moe, snippets
from moec.backends.torch.ops import EXPRESSIONS, SNIPPETS_USED_BY
from moec.ir.graph import Graph, Node, Ref
from moec.moe import ROUTER_WEIGHT

IMPORTS = [
    "from __future__ import annotations",
    "",
    "import math",
    "",
    "import torch",
    "import torch.nn.functional as F",
    "from torch import nn",
    "",
    "{output_import}",
    "from moec.backends.torch import runtime",
]


def class_name(spec_name: str) -> str:
    """``token_routed_tiny`` -> ``TokenRoutedTiny``; anything else becomes a safe identifier."""
    words = re.findall(r"[A-Za-z0-9]+", spec_name)
    name = "".join(word[:1].upper() + word[1:] for word in words)
    return name if name[:1].isalpha() else "Model" + name


def comment_safe(text: str) -> str:
    """Text for a ``#`` comment: one line, printable (escape anything else)."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def emit_program(graph: Graph, *, spec_name: str, header: list[str], moe_kernel: str = "auto", spectral_kernel: str = "auto",
                 attention_kernel: str = "auto") -> str:
    fused = _FusedFunctions(moe_kernel, spectral_kernel, attention_kernel)
    forward = _forward(graph, fused)
    helpers = _helpers(graph, fused)
    lines = [f"# {comment_safe(line)}" if line else "#" for line in header]
    lines += [""] + [line.format(output_import=_output_import(graph)) for line in IMPORTS] + ["", f"SPEC_NAME = {spec_name!r}", ""]
    for block in helpers + fused.sources:
        lines += ["", *block, ""]
    lines += ["", *_module_class(graph, class_name(spec_name), forward), "", "", f"Model = {class_name(spec_name)}"]
    return "\n".join(lines).rstrip() + "\n"


def _output_import(graph: Graph) -> str:
    ops = {node.op for node in graph.nodes}
    names = ["ModelOutput"] + (["MoeStats"] if ops & {"moe", "spectral_moe"} else []) + (["mean_stats"] if "spectral_moe" in ops else [])
    return f"from moec.backends.output import {', '.join(names)}"


class _FusedFunctions:
    """One generated function per distinct fused configuration: fused_moe_0, fused_moe_1, fused_spectral_moe_0, ..."""

    def __init__(self, moe_kernel: str, spectral_kernel: str, attention_kernel: str = "auto"):
        self.moe_kernel, self.spectral_kernel = moe_kernel, spectral_kernel
        self.attention = "attention_eager" if attention_kernel == "eager" else "attention"  # auto, sdpa: torch SDPA
        self.names: dict[tuple, str] = {}
        self.sources: list[list[str]] = []

    def moe(self, attrs: dict) -> str:
        key = ("moe", tuple(sorted(attrs.items())))
        if key not in self.names:
            name = f"fused_moe_{sum(k[0] == 'moe' for k in self.names)}"
            self.names[key] = name
            kernel = codegen_moe.choose_kernel(self.moe_kernel, attrs["moe"])
            self.sources.append(codegen_moe.moe_function(name, attrs["slots"], attrs["moe"], kernel))
        return self.names[key]

    def spectral(self, attrs: dict) -> str:
        key = ("spectral", tuple(sorted(attrs.items())))
        if key not in self.names:
            moe_name = self.moe({"slots": codegen_moe.inner_slots(attrs["slots"]), "moe": attrs["moe"]})
            name = f"fused_spectral_moe_{sum(k[0] == 'spectral' for k in self.names)}"
            self.names[key] = name
            self.sources.append(codegen_moe.spectral_function(name, moe_name, attrs, self.spectral_kernel))
        return self.names[key]


def _helpers(graph: Graph, fused: _FusedFunctions) -> list[list[str]]:
    used = {"make_parameters"}
    for node in graph.nodes:
        used |= SNIPPETS_USED_BY[node.op](node) if node.op in SNIPPETS_USED_BY else set()
        used |= {_attention_fn(node, fused)} if node.op == "attention" else set()
        if node.op in ("moe", "spectral_moe"):
            used |= codegen_moe.helpers_for(node.attr["moe"])
        if node.op == "spectral_moe":
            used |= {"rfft_real", "irfft_real", "dft_matrices", "spectral_scales", "band_index"}
    order = [name for name, fn in vars(snippets).items() if inspect.isfunction(fn) and fn.__module__ == snippets.__name__]
    return [inspect.getsource(getattr(snippets, name)).rstrip().splitlines() for name in order if name in used]


def param_expr(name: str) -> str:
    """``blocks.3.moe.experts.w_up`` -> ``self.blocks[3].moe.experts.w_up``."""
    parts = [f"[{part}]" if part.isdigit() else f".{part}" for part in name.split(".")]
    return "self" + "".join(parts)


def value_name(ref: Ref, graph: Graph) -> str:
    node = graph[ref.node]
    if node.op == "param":
        return param_expr(node.attr["name"])
    if node.op == "input":
        return str(node.attr["name"])
    return ref.node if ref.index == 0 else f"{ref.node}_{ref.index}"


def _forward(graph: Graph, fused: _FusedFunctions) -> list[str]:
    last_use = _last_uses(graph)
    source = next(node for node in graph.nodes if node.op == "input").attr["name"]
    stats: list[str] = []
    lines = []
    for index, node in enumerate(graph.nodes):
        if node.op in ("param", "input"):
            continue
        args = [value_name(ref, graph) for ref in node.inputs]
        expr = _expression(node, args, fused, source)
        targets = ", ".join(value_name(Ref(node.name, i), graph) for i in range(len(node.types or (None,))))
        if node.op in ("moe", "spectral_moe"):
            targets += f", stats_{len(stats)}"
            stats.append(f"stats_{len(stats)}")
        shapes = ", ".join(str(t) for t in node.types or ())
        where = f"  {comment_safe(node.origin)}" if node.origin is not None else ""
        lines.append(f"        {targets} = {expr}  # {shapes}{where}")
        # Parameters live on the module; the input is kept for constants' device.
        dead = sorted({value_name(ref, graph) for ref in node.inputs
                       if last_use.get(ref) == index and graph[ref.node].op not in ("param", "input")})
        if dead:
            lines.append(f"        del {', '.join(dead)}")
    output, aux = (value_name(ref, graph) for ref in graph.outputs)
    moe_stats = f"({', '.join(stats)}{',' if len(stats) == 1 else ''})"
    lines.append(f"        return ModelOutput(output={output}, aux_loss={aux}, moe_stats={moe_stats})")
    return lines


def moe_layers(graph: Graph) -> tuple[str, ...]:
    """Names of the MoE layers, in forward order: the prefix of each one's router weight."""
    names = []
    for node in graph.nodes:
        if node.op in ("moe", "spectral_moe"):
            router = node.inputs[node.attr["slots"].index(ROUTER_WEIGHT)]
            names.append(graph[router.node].attr["name"].removesuffix("." + ROUTER_WEIGHT))
    return tuple(names)


def _expression(node: Node, args: list[str], fused: _FusedFunctions, source: str) -> str:
    if node.op == "constant":
        return f"torch.full((), {node.attr['value']!r}, device={source}.device)"
    if node.op == "moe":
        return f"{fused.moe(node.attr)}({', '.join(args)}, self.training)"
    if node.op == "spectral_moe":
        return f"{fused.spectral(node.attr)}({', '.join(args)}, self.training)"
    if node.op == "attention" and _attention_fn(node, fused) == "attention_local":
        sinks = args[3] if len(args) == 4 else "None"
        return (f"attention_local({', '.join(args[:3])}, {node.attr['heads']}, {node.attr['kv_heads']}, {node.attr['head_dim']}, "
                f"{node.attr.get('window')!r}, {sinks})")
    if node.op == "attention":
        return EXPRESSIONS["attention"](node, *args, fn=fused.attention)
    emit = EXPRESSIONS.get(node.op)
    if emit is None:  # an unfused MoE / spectral op: only when a fusion pass was disabled
        attrs = "{" + ", ".join(f"{key!r}: {value!r}" for key, value in node.attrs) + "}"
        return f"runtime.reference_op({node.op!r}, {attrs}, self.training, {source}.shape[1]{''.join(', ' + a for a in args)})"
    return emit(node, *args)


def _attention_fn(node: Node, fused: _FusedFunctions) -> str:
    """Sinks or a sliding window: the written-out ``attention_local``; else the kernel's choice."""
    return "attention_local" if len(node.inputs) == 4 or node.attr.get("window") is not None else fused.attention


def _last_uses(graph: Graph) -> dict[Ref, int]:
    last: dict[Ref, int] = {}
    for index, node in enumerate(graph.nodes):
        for ref in node.inputs:
            last[ref] = index
    for ref in graph.outputs:
        last[ref] = len(graph.nodes)  # returned: never deleted
    return last


def _module_class(graph: Graph, name: str, forward: list[str]) -> list[str]:
    source = next(node for node in graph.nodes if node.op == "input")
    arg, dtype = source.attr["name"], source.attr["dtype"]
    out_type, aux_type = (graph.type_of(ref) for ref in graph.outputs)
    lines = [
        f"class {name}(nn.Module):",
        f'    """The model of spec SPEC_NAME: forward({arg}) -> ModelOutput(output, aux_loss, moe_stats)."""',
        "",
        f"    MOE_LAYERS = {moe_layers(graph)!r}  # the layers of ModelOutput.moe_stats, in order",
        "",
        "    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:",
        "        super().__init__()",
        *_declarations(graph),
        "",
        f"    def forward(self, {arg}: torch.Tensor) -> ModelOutput:",
        f'        """{arg}: {source.type} -> output {out_type}, aux_loss {aux_type}."""',
        *forward,
        "",
        "    def example_inputs(self, batch: int = 2, seq: int = 64, seed: int = 0) -> tuple[torch.Tensor]:",
        '        """Random inputs of the right kind for ``forward``."""',
        "        generator = torch.Generator().manual_seed(seed)",
        "        device = next(self.parameters()).device",
    ]
    if dtype == "i64":
        vocab = graph["embed.weight"].attr["shape"][0]
        lines.append(f"        return (torch.randint(0, {vocab}, (batch, seq), generator=generator).to(device),)")
    else:
        lines.append(f"        return (torch.randn(batch, seq, {source.attr['shape'][2]}, generator=generator).to(device),)")
    return lines


def _declarations(graph: Graph) -> list[str]:
    """``__init__`` lines creating the parameter tree whose state_dict keys are the graph's names."""
    leaves: dict[str, tuple[dict, dict]] = {}
    for node in graph.params():
        assert "." in node.attr["name"], f"parameter {node.attr['name']} has no owning module"
        owner, leaf = node.attr["name"].rsplit(".", 1)
        trainable, frozen = leaves.setdefault(owner, ({}, {}))
        (trainable if node.attr["trainable"] else frozen)[leaf] = tuple(node.attr["shape"])
    lines, made = [], set()
    blocks = sorted({int(name.split(".")[1]) for name in leaves if name.startswith("blocks.")})
    if blocks:
        lines.append(f"        self.blocks = nn.ModuleList(nn.Module() for _ in range({len(blocks)}))")
        made |= {"blocks"} | {f"blocks.{i}" for i in blocks}
    for owner, (trainable, frozen) in leaves.items():
        parts = owner.split(".")
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            if prefix not in made:
                lines.append(f"        {param_expr(prefix)} = nn.Module()")
                made.add(prefix)
        shapes = ", ".join(f"{k!r}: {v!r}" for k, v in trainable.items())
        extra = f", {{{', '.join(f'{k!r}: {v!r}' for k, v in frozen.items())}}}" if frozen else ""
        lines.append(f"        {param_expr(owner)} = make_parameters(device, dtype, {{{shapes}}}{extra})")
        made.add(owner)
    return lines
