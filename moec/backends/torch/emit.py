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

from moec.backends.torch import codegen_moe, codegen_tp, decode, snippets
from moec.backends.torch.blocks import Segment, attribute_expr, is_fused, segments
from moec.backends.torch.modules import block_class, root_class
from moec.backends.torch.ops import EXPRESSIONS, SNIPPETS_USED_BY
from moec.ir.graph import Graph, Node, Ref
from moec.moe import EXPERT_PREFIX, ROUTER_WEIGHT

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
                 attention_kernel: str = "auto", expert_parallel: bool = False, tiles: tuple[int, ...] = (),
                 tensor_splits: dict[str, str] | None = None, sequence_parallel: bool = False,
                 replicated_kv: dict[str, int] | None = None) -> str:
    """``tensor_splits``: parameter name -> ``column`` / ``row`` under tensor parallelism; ``replicated_kv``: the whole
    k / v projections read one KV head per rank -> their kv_heads (``codegen_tp``)."""
    fused = _FusedFunctions(moe_kernel, spectral_kernel, attention_kernel, expert_parallel, tiles, dict(tensor_splits or {}))
    fused.replicated_kv = dict(replicated_kv or {})
    fused.sequence_parallel = sequence_parallel and bool(tensor_splits)
    cut = segments(graph)
    forward, bodies = _forward(graph, fused, cut)
    helpers = _helpers(graph, fused)
    lines = [f"# {comment_safe(line)}" if line else "#" for line in header]
    imports = [line.format(output_import=_output_import(graph)) for line in IMPORTS]
    if _global_balance(graph):
        imports.append("from moec.backends.torch.data_parallel import batch_counts")
    if expert_parallel:
        imports.append("from moec.backends.torch.experts import experts_ffn")
    if fused.splits:
        imports.append(codegen_tp.IMPORT)
    if fused.triton:
        imports.append("from moec.backends import triton as triton_moe")
    lines += [""] + imports + ["", f"SPEC_NAME = {spec_name!r}", ""]
    for block in helpers + fused.sources:
        lines += ["", *block, ""]
    for segment in cut:
        if segment.block is not None:
            lines += ["", *block_class(graph, segment, bodies[segment.block]), ""]
    root = root_class(graph, class_name(spec_name), forward, moe_layers(graph))
    if decode.decode_support(graph) is None:  # the decode path: the same nodes once more, with a KV cache
        _add_decode(lines, root, graph, fused, cut)
    lines += ["", *root, "", "", f"Model = {class_name(spec_name)}"]
    return "\n".join(lines).rstrip() + "\n"


def _global_balance(graph: Graph) -> bool:
    """Some MoE layer sums its load-balance counts over the data-parallel ranks (aux.load_balance_batch 'global')."""
    return any(node.attr["moe"].aux.load_balance_batch == "global" for node in graph.nodes if node.op in ("moe", "spectral_moe"))


def _add_decode(lines: list[str], root: list[str], graph: Graph, fused: _FusedFunctions, cut: list[Segment]) -> None:
    """Append each block class's ``decode`` and the root's decode methods (``moec.backends.torch.decode``)."""
    forward, bodies = _forward(graph, fused, cut, decode.DecodeExpressions(graph))
    helpers = decode.helpers(graph)
    first_class = next(i for i, line in enumerate(lines) if line.startswith("class "))
    lines[first_class - 1:first_class - 1] = [line for block in helpers for line in ["", *block, ""]]
    for segment in cut:
        if segment.block is not None:
            start = lines.index(f"class Block{segment.block}(nn.Module):")
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("class ")), len(lines))
            while not lines[end - 1].strip():
                end -= 1
            args = ", ".join(value_name(ref, graph) for ref in segment.inputs)
            lines[end:end] = decode.block_method(args, bodies[segment.block])
    source = next(node for node in graph.nodes if node.op == "input").attr["name"]
    root += decode.root_methods(graph, source, forward)


def _output_import(graph: Graph) -> str:
    ops = {node.op for node in graph.nodes}
    names = ["ModelOutput"] + (["MoeStats"] if ops & {"moe", "spectral_moe"} else []) + (["mean_stats"] if "spectral_moe" in ops else [])
    return f"from moec.backends.output import {', '.join(names)}"


class _FusedFunctions:
    """One generated function per distinct fused configuration: fused_moe_0, fused_moe_1, fused_spectral_moe_0, ..."""

    def __init__(self, moe_kernel: str, spectral_kernel: str, attention_kernel: str = "auto", expert_parallel: bool = False,
                 tiles: tuple[int, ...] = (), splits: dict[str, str] | None = None):
        self.moe_kernel, self.spectral_kernel, self.expert_parallel = moe_kernel, spectral_kernel, expert_parallel
        self.splits = splits or {}  # tensor parallelism: parameter name -> column / row
        self.sequence_parallel = False  # and the hidden state split along the sequence between the groups
        self.replicated_kv: dict[str, int] = {}  # k / v projections kept whole, one KV head read per rank -> kv_heads
        self.split_experts = any(EXPERT_PREFIX in name for name in self.splits)  # experts.up / experts.down listed
        self.tiles, self.triton = tiles, False  # triton: some function calls moec.backends.triton
        self.attention = "attention_eager" if attention_kernel == "eager" else "attention"  # auto, sdpa: torch SDPA
        self.names: dict[tuple, str] = {}
        self.sources: list[list[str]] = []

    def moe(self, attrs: dict) -> str:
        key = ("moe", tuple(sorted(attrs.items())))
        if key not in self.names:
            name = f"fused_moe_{sum(k[0] == 'moe' for k in self.names)}"
            self.names[key] = name
            kernel = codegen_moe.choose_kernel(self.moe_kernel, attrs["moe"], self.expert_parallel)
            self.triton |= codegen_moe.uses_triton(kernel) and not self.expert_parallel
            self.sources.append(codegen_moe.moe_function(name, attrs["slots"], attrs["moe"], kernel, self.expert_parallel, self.tiles,
                                                         tensor_parallel=self.split_experts))
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


def param_expr(name: str, owner: str = "") -> str:
    """``blocks.3.moe.experts.w_up`` -> ``self.blocks[3].moe.experts.w_up`` (``self.moe.experts.w_up`` in ``blocks.3``)."""
    return attribute_expr(name.removeprefix(owner + ".") if owner else name)


class _Writer:
    """Statements of one module's ``forward``: graph values by name, parameters relative to ``owner``."""

    def __init__(self, graph: Graph, fused: _FusedFunctions, owner: str, anchor: str, decoding=None):
        self.graph, self.fused, self.owner = graph, fused, owner
        self.decoding = decoding  # DecodeExpressions when writing the decode path
        self.anchor = anchor  # a [B,S,...] value in scope: constants' device, unfused ops' sequence length
        self.last_use = _last_uses(graph)
        self.lines: list[str] = []
        self.splits = fused.splits if decoding is None else {}  # decode runs whole, on one process
        self.copied: set[str] = set()  # values that went through tensor_parallel.copy

    def name(self, ref: Ref) -> str:
        node = self.graph[ref.node]
        return param_expr(node.attr["name"], self.owner) if node.op == "param" else value_name(ref, self.graph)

    def node(self, index: int, stats: list[str]) -> None:
        node = self.graph.nodes[index]
        args = [self.name(ref) for ref in node.inputs]
        if self.splits:
            node, args = self.tensor_parallel(node, args)
        expr = (self.decoding and self.decoding.expression(node, args)) or _expression(node, args, self.fused, self.anchor)
        if self.splits and node.op == "embed" and self.split_of(node, 1):
            expr = codegen_tp.embedding(args, node.attr.get("padding_idx"))  # this rank's rows of the vocabulary, summed
        if self.splits and self.split_of(node, 1) == "row":
            expr = codegen_tp.reduced(expr, self.fused.sequence_parallel)  # g: the row-split product's partial sums
        targets = ", ".join(value_name(Ref(node.name, i), self.graph) for i in range(len(node.types or (None,))))
        if is_fused(node):
            stats.append(f"stats_{len(stats)}")
            targets += f", {stats[-1]}"
        shapes = ", ".join(str(t) for t in node.types or ())
        where = f"  {comment_safe(node.origin)}" if node.origin is not None else ""
        self.lines.append(f"        {targets} = {expr}  # {shapes}{where}")
        self.free([ref for ref in node.inputs if self.last_use.get(ref) == index])

    def split_of(self, node: Node, position: int) -> str | None:
        """``column`` / ``row`` when input ``position`` of a linear (or the table of an embedding) is a
        tensor-parallel split weight."""
        if node.op not in ("linear", "embed") or len(node.inputs) <= position:
            return None
        source = self.graph[node.inputs[position].node]
        return self.splits.get(source.attr["name"]) if source.op == "param" else None

    def tensor_parallel(self, node: Node, args: list[str]) -> tuple[Node, list[str]]:
        """The rank-local form of a statement (``moec.backends.torch.codegen_tp``)."""
        if node.op in ("rope", "attention"):
            return codegen_tp.local_heads(node, args), args
        if node.op in ("moe", "spectral_moe"):  # under expert parallelism experts_ffn reads the DTensors' meshes itself
            return node, [codegen_tp.local(arg) if self.splits.get(self.graph[ref.node].attr.get("name")) and not self.fused.expert_parallel
                          else arg for ref, arg in zip(node.inputs, args)]
        split, kv_heads = self.split_of(node, 1), self.replicated_kv(node)
        if split is None and kv_heads is None:
            return node, args
        if (split == "column" and node.op == "linear") or kv_heads is not None:
            if args[0] not in self.copied:
                self.copied.add(args[0])
                # the root holds the whole sequence (it splits and gathers it around the blocks): there f is a copy
                sequence_parallel = self.fused.sequence_parallel and self.owner != ""
                self.lines.append(codegen_tp.copy_statement(args[0], sequence_parallel))
            args = [codegen_tp.copied(args[0])] + args[1:]
        if kv_heads is not None:
            return node, [args[0], *(codegen_tp.kv_shard(arg, kv_heads, self.fused.sequence_parallel) for arg in args[1:])]
        return node, [args[0], codegen_tp.local(args[1]), *args[2:]]

    def replicated_kv(self, node: Node) -> int | None:
        """kv_heads when ``node`` is a linear through a whole k / v projection read one KV head per rank."""
        if node.op != "linear" or self.decoding is not None:
            return None
        return self.fused.replicated_kv.get(self.graph[node.inputs[1].node].attr.get("name"))

    def free(self, refs: list[Ref]) -> None:
        """``del`` the values read for the last time (parameters live on the module; the input stays)."""
        dead = {value_name(ref, self.graph) for ref in refs if self.graph[ref.node].op not in ("param", "input")}
        dead = sorted(dead | {codegen_tp.copied(name) for name in dead & self.copied})
        if dead:
            self.lines.append(f"        del {', '.join(dead)}")


def _tuple(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names)


def _forward(graph: Graph, fused: _FusedFunctions, cut: list[Segment], decoding=None) -> tuple[list[str], dict[int, list[str]]]:
    """The root's forward, and each block's forward body by block index (``decoding``: their decode methods)."""
    source = next(node for node in graph.nodes if node.op == "input").attr["name"]
    root, stats, bodies = _Writer(graph, fused, "", source, decoding), [], {}
    call, extra = (".decode", ", cache, positions, bucket") if decoding else ("", "")
    for segment in cut:
        if segment.block is None:
            for index in segment.nodes:
                root.node(index, stats)
            continue
        writer = _Writer(graph, fused, f"blocks.{segment.block}", value_name(segment.inputs[0], graph), decoding)
        first = len(stats)
        for index in segment.nodes:
            writer.node(index, stats)
        returned = [value_name(ref, graph) for ref in segment.outputs] + stats[first:]
        writer.lines.append(f"        return {_tuple(returned)}")
        bodies[segment.block] = writer.lines
        args = ", ".join(root.name(ref) for ref in segment.inputs)
        where = comment_safe(_block_origin(graph, segment))
        sequence_parallel = fused.sequence_parallel and not decoding
        if sequence_parallel and segment.block == 0:
            root.lines += [codegen_tp.split_statement(root.name(ref)) for ref in segment.inputs if graph.type_of(ref).rank == 3]
        root.lines.append(f"        {_tuple(returned)} = self.blocks[{segment.block}]{call}({args}{extra})  # {where}")
        if sequence_parallel and segment.block == max(s.block for s in cut if s.block is not None):
            root.lines += [codegen_tp.gather_statement(value_name(ref, graph)) for ref in segment.outputs
                           if graph.type_of(ref).rank == 3]
        root.free([ref for ref in segment.inputs if root.last_use.get(ref) in segment.span])
    output, aux = (value_name(ref, graph) for ref in graph.outputs)
    moe_stats = f"({', '.join(stats)}{',' if len(stats) == 1 else ''})"
    root.lines.append(f"        return ModelOutput(output={output}, aux_loss={aux}, moe_stats={moe_stats})")
    return root.lines, bodies


def _block_origin(graph: Graph, segment: Segment) -> str:
    """``blocks.3  specs/x.yaml:14 model.blocks[1].norm``: the block and where its first statement comes from."""
    origin = graph.nodes[segment.nodes[0]].origin
    return f"blocks.{segment.block}" + (f"  {origin}" if origin is not None else "")


def value_name(ref: Ref, graph: Graph) -> str:
    node = graph[ref.node]
    if node.op == "param":
        return param_expr(node.attr["name"])
    if node.op == "input":
        return str(node.attr["name"])
    return ref.node if ref.index == 0 else f"{ref.node}_{ref.index}"


def moe_layers(graph: Graph) -> tuple[str, ...]:
    """Names of the MoE layers, in forward order: the prefix of each one's router (or first expert) weight."""
    names = []
    for node in graph.nodes:
        if node.op in ("moe", "spectral_moe"):
            slot = ROUTER_WEIGHT if ROUTER_WEIGHT in node.attr["slots"] else EXPERT_PREFIX + "w_up"  # token_id: no router weight
            param = node.inputs[node.attr["slots"].index(slot)]
            names.append(graph[param.node].attr["name"].removesuffix("." + slot))
    return tuple(names)


def _expression(node: Node, args: list[str], fused: _FusedFunctions, anchor: str) -> str:
    if node.op == "constant":
        return f"torch.full((), {node.attr['value']!r}, device={anchor}.device)"
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
        return f"runtime.reference_op({node.op!r}, {attrs}, self.training, {anchor}.shape[1]{''.join(', ' + a for a in args)})"
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
