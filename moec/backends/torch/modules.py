"""The classes of a generated program: ``Block<i>`` per block and the root model.

Each class creates the parameters it owns in ``__init__`` (a tree of small modules whose
state_dict keys are the graph's parameter names) and has the ``forward`` written by the
emitter. The root holds the blocks in ``self.blocks`` (an ``nn.ModuleList``).
"""

from __future__ import annotations

from moec.backends.torch.blocks import Segment, attribute_expr, block_of
from moec.ir.graph import Graph

INIT = "    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:"


def declarations(graph: Graph, block: int | None) -> list[str]:
    """``__init__`` lines for the parameters of ``block`` (``None``: those outside every block)."""
    prefix = f"blocks.{block}." if block is not None else ""
    leaves: dict[str, tuple[dict, dict]] = {}
    for node in graph.params():
        name = node.attr["name"]
        if block_of(name) != block:
            continue
        assert "." in name, f"parameter {name} has no owning module"
        owner, leaf = name.removeprefix(prefix).rsplit(".", 1)
        trainable, frozen = leaves.setdefault(owner, ({}, {}))
        (trainable if node.attr["trainable"] else frozen)[leaf] = tuple(node.attr["shape"])
    lines, made = [], set()
    for owner, (trainable, frozen) in leaves.items():
        parts = owner.split(".")
        for depth in range(1, len(parts)):
            parent = ".".join(parts[:depth])
            if parent not in made:
                lines.append(f"        {attribute_expr(parent)} = nn.Module()")
                made.add(parent)
        shapes = ", ".join(f"{k!r}: {v!r}" for k, v in trainable.items())
        extra = f", {{{', '.join(f'{k!r}: {v!r}' for k, v in frozen.items())}}}" if frozen else ""
        lines.append(f"        {attribute_expr(owner)} = make_parameters(device, dtype, {{{shapes}}}{extra})")
        made.add(owner)
    return lines


def block_class(graph: Graph, segment: Segment, body: list[str]) -> list[str]:
    from moec.backends.torch.emit import value_name

    args = ", ".join(value_name(ref, graph) for ref in segment.inputs)
    returned = ", ".join(value_name(ref, graph) for ref in segment.outputs)
    return [
        f"class Block{segment.block}(nn.Module):",
        f'    """blocks.{segment.block}: forward({args}) -> {returned}{", moe stats" if "stats_" in body[-1] else ""}."""',
        "",
        INIT,
        "        super().__init__()",
        *declarations(graph, segment.block),
        "",
        f"    def forward(self, {args}):",
        *body,
    ]


def root_class(graph: Graph, name: str, forward: list[str], moe_layers: tuple[str, ...]) -> list[str]:
    source = next(node for node in graph.nodes if node.op == "input")
    arg, dtype = source.attr["name"], source.attr["dtype"]
    out_type, aux_type = (graph.type_of(ref) for ref in graph.outputs)
    blocks = sorted({b for b in (block_of(node.attr["name"]) for node in graph.params()) if b is not None})
    lines = [
        f"class {name}(nn.Module):",
        f'    """The model of spec SPEC_NAME: forward({arg}) -> ModelOutput(output, aux_loss, moe_stats)."""',
        "",
        f"    MOE_LAYERS = {moe_layers!r}  # the layers of ModelOutput.moe_stats, in order",
        "",
        INIT,
        "        super().__init__()",
    ]
    if blocks:
        made = ", ".join(f"Block{b}(device, dtype)" for b in blocks)
        lines.append(f"        self.blocks = nn.ModuleList([{made}])")
    lines += [
        *declarations(graph, None),
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
