"""The root class of a generated program: embeddings, ``for block in self.blocks``, the final norm and head.

The root's prologue and epilogue are the graph's nodes outside every block, written as
statements; the blocks run in one loop (their ``forward`` s share one contract,
``emit.BlockContract``), which sums their aux losses in block order, as the graph's epilogue
does, and collects their MoE statistics. With a decode path the root also has the methods
that drive generation (``moec.backends.torch.decode``).
"""

from __future__ import annotations

import re

from moec.backends.torch import decode, mtp
from moec.backends.torch.blocks import moe_layers
from moec.backends.torch.modules import INIT_ARGS, declarations
from moec.backends.torch.statements import Body, Statement
from moec.ir.graph import Ref


def root_class(emitter, name: str, blocks: list[tuple[str, int]]) -> list[str]:
    graph, contract = emitter.graph, emitter.contract
    cut = emitter.cut
    prologue = cut[0].nodes if cut[0].block is None else []
    epilogue = cut[-1].nodes if cut[-1].block is None and len(cut) > 1 else []
    predict = _needed(graph, epilogue, graph.outputs[0])
    source = next(node for node in graph.nodes if node.op == "input")
    arg = str(source.attr["name"])
    block_segments = [s for s in cut if s.block is not None]
    hidden = _hidden_input(contract, block_segments[0]) if block_segments else None
    cache_arg = ", cache: KVCache | None = None" if emitter.decoding else ""
    inputs = _method(emitter, prologue, [Ref(source.name, 0)], [arg], hidden or graph.outputs[0])
    last_hidden = next((ref for ref in block_segments[-1].outputs if contract.kind_of(ref) == "x"), None) if block_segments else None
    head = _method(emitter, predict, [last_hidden] if last_hidden else [], ["x"], graph.outputs[0])
    body = Body(emitter, "", [i for i in epilogue if i not in predict], [graph.outputs[1]])
    body.anchor = "x"
    reads_cache = emitter.decoding and any(re.search(r"\bcache\b", line) for line in inputs)  # learned positions
    body.call(["x"], f"self.embed_inputs({arg}{', cache' if reads_cache else ''})")
    if block_segments:
        _loop(emitter, body, block_segments)
    body.names.reserved.add("x")  # predict(x) reads it last
    chain = _aux_chains(emitter, block_segments, epilogue)
    for node_name, kind in chain.items():
        body.names.fixed(Ref(node_name, 0), kind)
    for index in epilogue:
        if index not in predict and graph.nodes[index].name not in chain:
            body.node(index)
    aux = body.name(graph.outputs[1])
    stats = "tuple(stats)" if contract.aux else "()"
    shared_head = "self.head({})" if emitter.modules.get("head") == "Linear" else "F.linear({}, self.embed.weight)"
    if emitter.mtp is None:
        body.call([], f"return ModelOutput(output=self.predict(x), aux_loss={aux}, moe_stats={stats})")
    else:
        body.statements.append(_raw(mtp.root_lines(arg, shared_head, aux, stats, contract)))
    names = [n.attr["name"] for n in graph.params() if not str(n.attr["name"]).startswith("blocks.")]
    prologue_params = [p for p in names if _read_in(graph, prologue, p)]
    init = [f"    def __init__(self, {INIT_ARGS}) -> None:", "        super().__init__()",
            *declarations(graph, prologue_params, "", emitter.modules)]
    if blocks:
        init.append(f"        self.blocks = nn.ModuleList({_block_list(blocks, emitter.decoding)})")
    init += declarations(graph, [p for p in names if p not in prologue_params], "", emitter.modules)
    if emitter.fused.context_parallel and any(graph.nodes[i].op == "select_last" for i in predict):
        init.append("        self.context = None  # context parallelism (parallel.py sets it): the last position is on cp rank 0")
    if emitter.mtp is not None:
        init.append(f"        self.mtp = nn.ModuleList([{mtp.MTP_CLASS}(device, dtype) for _ in range({emitter.mtp.depth})])  "
                    "# multi-token prediction (training; generation drafts with it)")
    out_type, aux_type = (graph.type_of(ref) for ref in graph.outputs)
    lines = [
        f"class {name}(nn.Module):",
        f'    """The model of spec SPEC_NAME: forward({arg}) -> ModelOutput(output, aux_loss, moe_stats'
        f'{", mtp_logits in training" if emitter.mtp else ""})."""',
        "",
        f"    MOE_LAYERS = {_layer_names(_moe_layers(emitter))}  # the layers of ModelOutput.moe_stats, in order",
        *([f"    MTP_MOE_LAYERS = {emitter.mtp.moe_layers!r}  # in training, moe_stats continues with these"]
          if emitter.mtp is not None and emitter.mtp.moe_layers else []),
        "",
        *init,
        "",
        f"    def forward(self, {arg}: torch.Tensor{cache_arg}) -> ModelOutput:",
        f'        """{arg}: {source.type} -> output {out_type}, aux_loss {aux_type}."""',
        *body.lines([]),
        "",
        f"    def embed_inputs(self, {arg}: torch.Tensor{cache_arg if reads_cache else ''}) -> torch.Tensor:",
        f'        """{arg} -> the hidden state the first block reads (a pipeline\'s first stage runs this too)."""',
        *inputs,
        "",
        "    def predict(self, x: torch.Tensor) -> torch.Tensor:",
        '        """The last block\'s hidden state -> the output (a pipeline\'s last stage runs this too)."""',
        *head,
        "",
        *_example_inputs(graph, source),
    ]
    if emitter.decoding:
        lines += decode.root_methods(graph, arg)
    if emitter.mtp is not None:
        lines += mtp.draft_method(arg, shared_head, emitter.mtp.depth, contract)
    return lines


def _hidden_input(contract, segment) -> Ref:
    return next(ref for ref in segment.inputs if contract.kind_of(ref) == "x" and contract.graph[ref.node].op != "input")


def _method(emitter, indices: list[int], args: list[Ref], names: list[str], result: Ref) -> list[str]:
    """The body of a root method over ``indices``: ``args`` bound to ``names``, returning ``result``."""
    body = Body(emitter, "", indices, [result])
    for ref, name in zip(args, names):
        body.arg(ref, name)
    for index in indices:
        body.node(index)
    return body.lines([body.name(result)])


def _needed(graph, indices: list[int], output: Ref) -> list[int]:
    """The nodes of ``indices`` that ``output`` depends on, in order."""
    wanted = {output.node}
    for index in reversed(indices):
        if graph.nodes[index].name in wanted:
            wanted |= {ref.node for ref in graph.nodes[index].inputs}
    return [i for i in indices if graph.nodes[i].name in wanted]


def _moe_layers(emitter) -> tuple[str, ...]:
    return moe_layers(emitter.graph)


def _layer_names(names: tuple[str, ...]) -> str:
    """``tuple(f"blocks.{i}.moe" for i in range(64))`` when every block has the same MoE layers; else the names."""
    per_block: dict[int, list[str]] = {}
    for name in names:
        block, _, rest = name.removeprefix("blocks.").partition(".")
        if not name.startswith("blocks.") or not block.isdigit():
            return repr(names)
        per_block.setdefault(int(block), []).append(rest)
    layers = list(per_block.values())
    if len(layers) < 2 or sorted(per_block) != list(range(len(layers))) or any(row != layers[0] for row in layers):
        return repr(names)
    if len(layers[0]) == 1:
        return f'tuple(f"blocks.{{i}}.{layers[0][0]}" for i in range({len(layers)}))'
    return f'tuple(f"blocks.{{i}}.{{name}}" for i in range({len(layers)}) for name in {tuple(layers[0])!r})'


def _read_in(graph, indices: list[int], param: str) -> bool:
    return any(graph[ref.node].op == "param" and graph[ref.node].attr["name"] == param for i in indices for ref in graph.nodes[i].inputs)


def _block_list(blocks: list[tuple[str, int]], decoding: bool) -> str:
    """``[Block(slot, device, dtype) for slot in range(0, 4, 2)] + ...``: runs of consecutive blocks of one class."""
    runs: list[list] = []
    for cls, slots in blocks:
        if runs and runs[-1][0] == cls:
            runs[-1][2] += 1
        else:
            runs.append([cls, slots, 1])
    parts, first = [], 0
    for cls, slots, count in runs:
        if slots and decoding:
            stop = first + slots * count
            parts.append(f"[{cls}(slot, device, dtype) for slot in range({first}, {stop}{f', {slots}' if slots > 1 else ''})]")
        else:
            parts.append(f"[{cls}(device, dtype) for _ in range({count})]")
        first += slots * count
    return " + ".join(parts)


def _loop(emitter, body: Body, segments) -> None:
    """``for block in self.blocks: x, aux, stats = block(x, cache)`` with the sums the epilogue reads."""
    graph, contract = emitter.graph, emitter.contract
    if contract.aux:
        body.call(["aux", "stats"], "0.0, []")
    if contract.balance:
        body.call(["balance"], "0.0")
    if contract.velocity:
        body.call(["v"], "None")
    outputs = ["x"] + (["v"] if contract.velocity else []) + (["block_aux"] if contract.aux else []) \
        + (["block_balance"] if contract.balance else []) + (["block_stats"] if contract.aux else [])
    loop = ["        for block in self.blocks:", f"            {', '.join(outputs)} = block({contract.call_args()})"]
    if contract.aux:
        loop.append("            aux = aux + block_aux  # the blocks' aux losses, summed in order")
    if contract.balance:
        loop.append("            balance = balance + block_balance")
    if contract.aux:
        loop.append("            stats += block_stats")
    body.statements.append(_raw(loop))
    last = segments[-1]
    for ref in last.outputs:
        kind = contract.kind_of(ref)
        if kind in ("x", "v"):
            body.names.fixed(ref, kind)
    for segment in segments:  # every block's aux / balance outputs are the loop's sums
        for ref in segment.outputs:
            if contract.kind_of(ref) in ("aux", "balance"):
                body.names.fixed(ref, contract.kind_of(ref))


def _raw(lines: list[str]) -> Statement:
    return Statement([], "", lines=lines)


def _aux_chains(emitter, segments, epilogue: list[int]) -> dict[str, str]:
    """The epilogue's adds that sum the blocks' aux (or balance) outputs, which the loop sums: node name -> aux / balance."""
    graph, contract = emitter.graph, emitter.contract
    kinds = {ref: contract.kind_of(ref) for s in segments for ref in s.outputs if contract.kind_of(ref) in ("aux", "balance")}
    chain: dict[str, str] = {}
    for index in epilogue:
        node = graph.nodes[index]
        if node.op == "add" and all(ref in kinds for ref in node.inputs):
            chain[node.name] = kinds[Ref(node.name, 0)] = kinds[node.inputs[0]]
    return chain


def _example_inputs(graph, source) -> list[str]:
    lines = [
        "    def example_inputs(self, batch: int = 2, seq: int = 64, seed: int = 0) -> tuple[torch.Tensor]:",
        '        """Random inputs of the right kind for ``forward``."""',
        "        generator = torch.Generator().manual_seed(seed)",
        "        device = next(self.parameters()).device",
    ]
    if source.attr["dtype"] == "i64":
        vocab = graph["embed.weight"].attr["shape"][0]
        return lines + [f"        return (torch.randint(0, {vocab}, (batch, seq), generator=generator).to(device),)"]
    return lines + [f"        return (torch.randn(batch, seq, {source.attr['shape'][2]}, generator=generator).to(device),)"]
