"""The torch backend's emitter: fused graph -> the source of a readable ``model.py``.

The program reads like a model a person wrote (nanoGPT's, torchtitan's): one ``nn.Module``
class per distinct layer (``Attention``, ``MoE``, ``FeedForward``, ``SpectralMoE``,
``Dynamics``), one per distinct block structure, and the root model, which holds the blocks in
an ``nn.ModuleList`` and loops over them. Classes are written per block of the graph and
deduplicated by their text, so a spec with 2 blocks and one with 96 give the same classes.
One ``forward`` serves training and generation: with a KV cache (``cache``) the attention
layers write and read it, RoPE rotates at the cache's positions. The statement-per-node trace
of the same graph is ``ir.txt``.

Nothing from the spec is pasted as code: names are checked identifiers (the schema's
``LayerName``) and every other string goes in through ``repr``.
"""

from __future__ import annotations

import re

from moec.backends.torch import decode
from moec.backends.torch.blocks import is_fused, moe_layers, segments
from moec.backends.torch.fused import FusedFunctions, fused_method, fused_sources
from moec.backends.torch.layers import LayerPart, split_block
from moec.backends.torch.mtp import MtpPart, main_graph, mtp_class
from moec.backends.torch.modules import INIT_ARGS, declarations, standard_modules
from moec.backends.torch.ops import EXPRESSIONS
from moec.backends.torch.roots import root_class
from moec.backends.torch.statements import Body, param_expr, stats_ref
from moec.backends.torch.support import import_lines, support
from moec.ir.graph import Graph, Node, Ref

# The ops that read and write a layer's KV-cache slot: attention's keys and values, MLA's latent and rope key.
CACHE_OPS = ("attention", "latent_cache")

IMPORTS = [
    "from __future__ import annotations",
    "",
    "import torch",
    "import torch.nn.functional as F",
    "from torch import nn",
    "",
]


def class_name(spec_name: str) -> str:
    """``token_routed_tiny`` -> ``TokenRoutedTiny``; anything else becomes a safe identifier."""
    words = re.findall(r"[A-Za-z0-9]+", spec_name)
    name = "".join(word[:1].upper() + word[1:] for word in words)
    return name if name[:1].isalpha() else "Model" + name


def comment_safe(text: str) -> str:
    """Text for a ``#`` comment or a docstring: one line, printable (escape anything else)."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text)).replace('"""', "'''").replace("\\", "/")


def emit_program(graph: Graph, *, spec_name: str, header: list[str], moe_kernel: str = "auto", spectral_kernel: str = "auto",
                 attention_kernel: str = "auto", expert_parallel: bool = False, tiles: tuple[int, ...] = (),
                 tensor_splits: dict[str, str] | None = None, parallel_names: tuple[str, ...] = (),
                 context_parallel: bool = False, measured_kernels: dict | None = None) -> tuple[str, str]:
    """(model.py, model_support.py). ``measured_kernels``: kernels.moe auto's measured choice, MoeAttrs -> kernel;
    ``tensor_splits``: parameter name -> ``column`` / ``row`` under tensor parallelism;
    ``parallel_names``: what parallel.py imports from model_support.py (``moec.backends.parallel.plan.support_names``);
    ``context_parallel``: the spec splits the sequence (attention layers take a ``context``, parallel.py sets it)."""
    graph, mtp_part = main_graph(graph)  # the main model; head.mtp's modules are written around its last block
    emitter = Emitter(graph, FusedFunctions(moe_kernel, spectral_kernel, attention_kernel, expert_parallel, tiles,
                                            dict(tensor_splits or {}), context_parallel, measured_kernels), parallel_names, mtp_part)
    return emitter.program(spec_name, header)


class Emitter:
    """Writes the classes of one program from the fused graph."""

    def __init__(self, graph: Graph, fused: FusedFunctions, parallel_names: tuple[str, ...] = (), mtp: MtpPart | None = None):
        self.graph, self.fused, self.mtp = graph, fused, mtp
        self.splits, self.parallel_names = fused.splits, parallel_names
        self.expert_parallel = fused.expert_parallel
        self.decoding = decode.decode_support(graph) is None
        self.modules = standard_modules(graph)
        self.classes: dict[str, tuple[str, list[str]]] = {}  # class text (without its name line) -> (name, lines)
        self.cut = segments(graph)
        self.contract = BlockContract(graph, self.cut, self.decoding)

    # --- classes ------------------------------------------------------------------------------------
    def add_class(self, family: str, doc: str, body: list[str]) -> str:
        """The class called ``family`` (``family2``, ... when another class of the family differs) with this body."""
        key = "\n".join(body)
        if key not in self.classes:
            taken = {name for name, _ in self.classes.values()}
            name = next(f"{family}{n if n > 1 else ''}" for n in range(1, 1000) if f"{family}{n if n > 1 else ''}" not in taken)
            lines = [comment_safe(line) for line in doc.split("\n")]
            docstring = [f'    """{lines[0]}"""'] if len(lines) == 1 else \
                [f'    """{lines[0]}', "", *(f"    {line}" for line in lines[1:]), '    """']
            self.classes[key] = (name, [f"class {name}(nn.Module):", *docstring, "", *body])
        return self.classes[key][0]

    def layer_class(self, part: LayerPart) -> tuple[str, bool]:
        """The class of one layer of one block, and whether its constructor takes a KV-cache slot."""
        nodes = [self.graph.nodes[i] for i in part.nodes]
        has_cache = self.decoding and any(node.op in CACHE_OPS for node in nodes)
        names = [self.graph[ref.node].attr["name"] for node in nodes for ref in node.inputs if self.graph[ref.node].op == "param"]
        init = [f"    def __init__(self, {'slot: int, ' if has_cache else ''}{INIT_ARGS}) -> None:", "        super().__init__()"]
        init += [f"        self.slot = slot  # this layer's {'(latent, rope key)' if any(n.op == 'latent_cache' for n in nodes) else '(k, v)'} "
                 "in the KV cache"] if has_cache else []
        init += declarations(self.graph, list(dict.fromkeys(names)), part.prefix, self.modules)
        if self.fused.context_parallel and any(node.op in ("attention", "spectral_moe") for node in nodes):
            init.append("        self.context = None  # context parallelism (parallel.py sets it): this rank's part of the sequence")
        if len(nodes) == 1 and is_fused(nodes[0]):
            forward, doc = fused_method(self, part, nodes[0])
            if any("self.batch_group" in line for line in forward):
                ranks = "the group of the ranks holding the batch's tokens" if self.fused.context_parallel else \
                    "the data-parallel ranks' group"
                init.append(f"        self.batch_group = None  # {ranks} (parallel.py sets it): "
                            "expert counts over the whole batch")
        elif len(nodes) == 1 and nodes[0].op == "dynamics":
            forward, doc = self.dynamics_forward(part, nodes[0]), "INL dynamics: (x, v) -> (x', v'); v None: the first layer."
        else:
            forward, doc = self.layer_forward(part, has_cache), ""
        first = nodes[0]
        shapes = f"{self.graph.type_of(part.inputs[0])} -> {', '.join(str(self.graph.type_of(r)) for r in part.outputs)}"
        where = f"{first.origin}" if first.origin else part.prefix
        doc = f"{doc}\n{where}: {shapes}." if doc else f"{where}: {shapes}."
        return self.add_class(part.kind(self.graph), doc, [*init, "", *forward]), has_cache

    def dynamics_forward(self, part: LayerPart, node: Node) -> list[str]:
        """``forward(x, v=None)``: every dynamics layer alike, the first one reading no velocity (v = 0)."""
        params = [param_expr(self.graph[ref.node].attr["name"], part.prefix) for ref in node.inputs[-5:]]
        return ["    def forward(self, x, v=None):", f"        return {EXPRESSIONS['dynamics'](node, 'x', 'v', *params)}"]

    def layer_forward(self, part: LayerPart, has_cache: bool) -> list[str]:
        body = Body(self, part.prefix, part.nodes, part.outputs)
        args = [_argument_name(self.graph, ref, body) for ref in part.inputs]
        ropes = any(self.graph.nodes[i].op == "rope" for i in part.nodes)
        if has_cache and ropes:
            body.raw("        positions = None if cache is None else cache.positions")
        if self.fused.context_parallel and ropes:
            if not has_cache:
                body.raw("        positions = None")
            body.raw("        if self.context is not None:  # context parallel: RoPE at this rank's global positions")
            body.raw(f"            positions = self.context.positions({args[0]})")
        for index in part.nodes:
            body.node(index)
        returned = [body.name(ref) for ref in part.outputs]
        returned += [body.names.of[stats_ref(self.graph.nodes[i].name)] for i in part.nodes if is_fused(self.graph.nodes[i])]
        signature = ", ".join(args + (["cache: KVCache | None = None"] if has_cache else []))
        return [f"    def forward(self, {signature}):", *body.lines(returned)]

    def block_class(self, segment) -> tuple[str, int]:
        """The class of one block, and the number of attention layers (KV-cache slots) it holds."""
        items = split_block(self.graph, segment.block, segment.nodes)
        owner = f"blocks.{segment.block}"
        body = Body(self, owner, segment.nodes, segment.outputs)
        self.contract.bind_inputs(segment, body)
        init, slots, stats, aux, balance = [], 0, [], [], []
        for item in items:
            if isinstance(item, int):
                node = self.graph.nodes[item]
                names = [self.graph[ref.node].attr["name"] for ref in node.inputs if self.graph[ref.node].op == "param"]
                init += declarations(self.graph, names, owner, self.modules)
                body.node(item)
                continue
            cls, has_cache = self.layer_class(item)
            init.append(f"        self.{item.name} = {cls}({f'slot + {slots}, ' if has_cache and slots else 'slot, ' if has_cache else ''}"
                        f"device, dtype)")
            slots += has_cache
            stats_needed = any(is_fused(self.graph.nodes[i]) for i in item.nodes)
            if _is_dynamics(self.graph, item):
                item.outputs[:] = [Ref(self.graph.nodes[item.nodes[0]].name, i) for i in (0, 1)]
            targets = body.bind(item.outputs, [self.contract.role_of(ref, "h") for ref in item.outputs], body.at(item.nodes[-1]))
            aux += [t for ref, t in zip(item.outputs, targets) if self.contract.kind_of(ref) == "aux"]
            balance += [t for ref, t in zip(item.outputs, targets) if self.contract.kind_of(ref) == "balance"]
            if stats_needed:
                targets.append(body.names.bind(stats_ref(item.prefix), "stats", len(segment.nodes)))
                stats.append(targets[-1])
            args = [body.name(ref) for ref in item.inputs] + (["cache"] if has_cache else [])
            if _is_dynamics(self.graph, item):  # x, v = self.dynamics(x, v): the velocity goes in and out of every one
                args = [args[0], "v"]
            body.call(targets, f"self.{item.name}({', '.join(args)})", inline=len(targets) == 1)
        returned = self.contract.block_returns(segment, body, aux, balance, stats)
        signature = self.contract.signature()
        forward = [f"    def forward(self, {signature}):", *body.lines(returned)]
        layers = ", ".join(item.name for item in items if isinstance(item, LayerPart))
        origin = self.graph.nodes[segment.nodes[0]].origin
        doc = f"{origin.file}:{origin.line} " if origin and origin.file and origin.line else ""
        doc += f"model.blocks[{origin.path[2]}]: {layers}." if origin and len(origin.path) > 2 else f"{layers}."
        head = [f"    def __init__(self, {'slot: int, ' if slots else ''}{INIT_ARGS}) -> None:", "        super().__init__()"]
        return self.add_class("Block", doc, [*head, *init, "", *forward]), slots

    # --- expressions --------------------------------------------------------------------------------
    def expression(self, node: Node, args: list[str], body: Body) -> str | list[str]:
        if node.op == "constant":
            anchor = getattr(body, "anchor", None) or next(iter(body.names.of.values()), "x")
            return f"torch.full((), {node.attr['value']!r}, device={anchor}.device)"
        if node.op == "moe":
            return f"{self.fused.moe(node.attr)}({', '.join(args)}, self.training)"
        if node.op == "spectral_moe":
            return f"{self.fused.spectral(node.attr)}({', '.join(args)}, self.training)"
        if node.op == "attention":
            return self.attention(node, args)
        if node.op == "select_last" and self.fused.context_parallel:
            return ["        if self.context is not None:  # context parallel: the whole sequence's last position, from cp rank 0",
                    f"            @TARGET@ = self.context.last_position({args[0]})", "        else:",
                    f"            @TARGET@ = {EXPRESSIONS['select_last'](node, args[0])}"]
        if node.op == "rope" and (self.decoding or self.fused.context_parallel):
            return EXPRESSIONS["rope"](node, *args, positions="positions")
        if node.op == "mla_attention":
            fn = "mla_attention_eager" if self.fused.attention == "attention_eager" else "mla_attention"
            return EXPRESSIONS["mla_attention"](node, *args, fn=fn, positions="positions" if self.decoding else None)
        if node.op == "latent_cache":  # the identity in a full forward: its values keep their names
            if not self.decoding:
                return None
            return ["        if cache is not None:  # decoding: this step's latent and rope key go into the cache, the bucket's come out",
                    f"            @TARGETS@ = latent_cache({', '.join(args)}, cache.kv[self.slot], cache.positions, cache.bucket)"]
        if node.op == "pos_embed":
            return f"add_positions({args[0]}, {args[1]}{', None if cache is None else cache.positions' if self.decoding else ''})"
        emit = EXPRESSIONS.get(node.op)
        if emit is None:  # an unfused MoE / spectral op: only when a fusion pass was disabled
            attrs = "{" + ", ".join(f"{key!r}: {value!r}" for key, value in node.attrs) + "}"
            anchor = next(iter(body.names.of.values()), "x")
            return f"runtime.reference_op({node.op!r}, {attrs}, self.training, {anchor}.shape[1]{''.join(', ' + a for a in args)})"
        return emit(node, *args)

    def attention(self, node: Node, args: list[str]) -> str | list[str]:
        a = node.attr
        sinks = args[3] if len(args) == 4 else "None"
        if self.fused.attention_fn(node) == "attention_local":
            full = (f"attention_local({', '.join(args[:3])}, {a['heads']}, {a['kv_heads']}, {a['head_dim']}, "
                    f"{a.get('window')!r}, {sinks})")
        else:
            full = EXPRESSIONS["attention"](node, *args[:3], fn=self.fused.attention_fn(node))
        if self.fused.context_parallel:
            return self.context_attention(node, args, full)
        if not self.decoding:
            return full
        cached = (f"attention_cached({', '.join(args[:3])}, {a['heads']}, {a['kv_heads']}, {a['head_dim']}, cache.kv[self.slot], "
                  f"cache.positions, cache.bucket, {a.get('window')!r}, {sinks})")
        return ["        if cache is None:", f"            @TARGET@ = {full}", "        else:  # decoding: this step's keys and values go into the cache first",
                f"            @TARGET@ = {cached}"]

    def context_attention(self, node: Node, args: list[str], full: str) -> list[str]:
        """Under context parallelism: the queries of this rank's positions against the whole sequence's keys and values."""
        a = node.attr
        gathered = (f"context_attention({', '.join(args[:3])}, {a['heads']}, {a['kv_heads']}, {a['head_dim']}, {a['causal']}, "
                    f"{a.get('window')!r}, self.context)")
        lines = ["        if self.context is not None:  # context parallel: keys and values of the whole sequence from the cp group",
                 f"            @TARGET@ = {gathered}"]
        if not self.decoding:
            return lines + ["        else:", f"            @TARGET@ = {full}"]
        cached = (f"attention_cached({', '.join(args[:3])}, {a['heads']}, {a['kv_heads']}, {a['head_dim']}, cache.kv[self.slot], "
                  f"cache.positions, cache.bucket, {a.get('window')!r}, {args[3] if len(args) == 4 else 'None'})")
        return lines + ["        elif cache is None:", f"            @TARGET@ = {full}",
                        "        else:  # decoding: this step's keys and values go into the cache first", f"            @TARGET@ = {cached}"]

    # --- the program --------------------------------------------------------------------------------
    def program(self, spec_name: str, header: list[str]) -> tuple[str, str]:
        """(model.py, model_support.py)."""
        blocks = [self.block_class(segment) for segment in self.cut if segment.block is not None]
        root = root_class(self, class_name(spec_name), blocks)
        classes = [lines for _, lines in self.classes.values()]
        if self.mtp is not None:
            last, slots = blocks[-1]
            classes.append(mtp_class(self.mtp, last, bool(slots) and self.decoding, self.contract))
        text = "\n".join(line for lines in classes + [root] for line in lines)
        functions = fused_sources(self, text)
        text += "\n".join(line for lines in functions for line in lines)
        names, support_source = support(text, self.parallel_names)
        imports = list(IMPORTS)
        if re.search(r"\bmath\.", text):
            imports[2:2] = ["import math", ""]
        imports += import_lines(names)
        if "runtime.reference_op" in text:
            imports.append("from moec.backends.torch import runtime  # unfused ops: a fusion pass was disabled")
        if self.fused.triton:
            imports.append("from moec.backends import triton as triton_moe")
        lines = [f"# {comment_safe(line)}" if line else "#" for line in header]
        lines += [""] + imports + ["", f"SPEC_NAME = {spec_name!r}", ""]
        for block in functions + classes:
            lines += ["", *block, ""]
        lines += ["", *root, "", "", f"Model = {class_name(spec_name)}"]
        return "\n".join(lines).rstrip() + "\n", support_source


class BlockContract:
    """What every block's ``forward`` takes and returns, the same for all blocks so that the root loops over them:
    ``x`` [, ``v``: the dynamics velocity] [, ``tokens``: a token-id router's input] [, ``cache``] ->
    ``x`` [, ``v``] [, ``aux``: the block's aux loss [, ``balance``: its pooled load-balance statistics], ``stats``]."""

    def __init__(self, graph: Graph, cut, decoding: bool):
        self.graph = graph
        blocks = [s for s in cut if s.block is not None]
        ops = {graph.nodes[i].op for s in blocks for i in s.nodes}
        self.velocity = "dynamics" in ops
        self.tokens = any(graph[ref.node].op == "input" for s in blocks for ref in s.inputs)
        self.aux = bool(ops & {"moe", "spectral_moe"})
        self.balance = any(len(graph.nodes[i].types or ()) > 2 for s in blocks for i in s.nodes if is_fused(graph.nodes[i]))
        self.cache = decoding and bool(ops & set(CACHE_OPS))
        self.input_name = next((str(n.attr["name"]) for n in graph.nodes if n.op == "input"), "tokens")

    def kind_of(self, ref: Ref) -> str:
        node = self.graph[ref.node]
        if node.op == "dynamics":
            return "v" if ref.index == 1 else "x"
        if is_fused(node) or self.graph.type_of(ref).rank == 0:
            return {1: "aux", 2: "balance"}.get(ref.index, "x") if is_fused(node) else "aux"
        return "x"

    def role_of(self, ref: Ref, main: str) -> str:
        kind = self.kind_of(ref)
        return main if kind == "x" and self.graph[ref.node].op != "dynamics" else kind

    def signature(self) -> str:
        args = ["x"] + ([self.input_name] if self.tokens else []) + (["v=None"] if self.velocity else [])
        return ", ".join(args + (["cache: KVCache | None = None"] if self.cache else []))

    def call_args(self) -> str:
        """The root's arguments to a block; ``cache`` by keyword, so a sequence-parallel plan sees one input layout."""
        return ", ".join(["x"] + ([self.input_name] if self.tokens else []) + (["v"] if self.velocity else [])
                         + (["cache=cache"] if self.cache else []))

    def outputs(self) -> list[str]:
        return ["x"] + (["v"] if self.velocity else []) + (["aux"] if self.aux else []) + (["balance"] if self.balance else []) \
            + (["stats"] if self.aux else [])

    def bind_inputs(self, segment, body: Body) -> None:
        for ref in segment.inputs:
            node = self.graph[ref.node]
            body.arg(ref, str(node.attr["name"]) if node.op == "input" else self.kind_of(ref))

    def block_returns(self, segment, body: Body, aux: list[str], balance: list[str], stats: list[str]) -> list[str]:
        values = {self.kind_of(ref): body.name(ref) for ref in segment.outputs if self.kind_of(ref) in ("x", "v")}
        returned = [values["x"]] + ([values.get("v", "v")] if self.velocity else [])
        if self.aux:
            returned.append(" + ".join(aux) if aux else f"{values['x']}.new_zeros(())")
        if self.balance:  # a dense block among the MoE blocks adds nothing to the pooled statistics
            returned.append(" + ".join(balance) if balance else "0.0")
        if self.aux:
            returned.append(f"({', '.join(stats)},)" if len(stats) == 1 else f"({', '.join(stats)})")
        return returned


def _is_dynamics(graph: Graph, part: LayerPart) -> bool:
    return len(part.nodes) == 1 and graph.nodes[part.nodes[0]].op == "dynamics"


def _argument_name(graph: Graph, ref: Ref, body: Body) -> str:
    node = graph[ref.node]
    role_name = str(node.attr["name"]) if node.op == "input" else ("v" if node.op == "dynamics" and ref.index == 1 else "x")
    name = body.names.bind(ref, role_name, -1)
    return name
