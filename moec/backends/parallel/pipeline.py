"""Pipeline parallelism with ``torch.distributed.pipelining``: stage modules cut from the generated model.

A stage runs consecutive blocks of the generated model (``PIPELINE_STAGES``, balanced by FLOPs in
``moec.passes.stages``). The first stage also runs the program's ``embed_inputs`` (embeddings), the
last its ``predict`` (final norm, head): the same code one process runs, on the stage's own parameters. Between stages travel the hidden
state and the running sum of the MoE aux losses (each block's scalar outputs), so the aux losses reach
the loss on the last stage: ``loss_fn((logits, aux_rows), targets)`` adds ``aux_rows[0]``. The model's aux output must be that
sum (``pipeline_problem`` says why a graph cannot be pipelined). Under tensor parallelism the modules carry
parallel.py's plans (sequence parallelism splits the hidden state at the first block and gathers it after the
last), so a stage runs them as the whole model does.
"""

from __future__ import annotations

import torch
from torch import nn

from moec.backends.torch.blocks import segments
from moec.ir.graph import Graph, Ref

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B"}


def pipeline_problem(graph: Graph) -> str | None:
    """Why this graph cannot be cut into a chain of stages, or None."""
    cut = segments(graph)
    blocks = [s for s in cut if s.block is not None]
    for previous, block in zip(blocks, blocks[1:]):
        if len(block.inputs) != 1 or _hidden(graph, previous) != block.inputs[0]:
            return f"blocks.{block.block} reads more than the hidden state of blocks.{previous.block}"
    scalars = {ref for block in blocks for ref in block.outputs if _is_scalar(graph, ref)}
    if not _sum_of(graph, graph.outputs[1], scalars):
        return "the aux loss is not a sum of the blocks' aux outputs"
    prologue = _root_params(graph, cut[0].nodes) if cut[0].block is None else set()
    shared = prologue & (_root_params(graph, cut[-1].nodes) if cut[-1].block is None else set())
    if shared:  # the first and the last stage would each hold a copy, and their gradients would need summing
        return f"the first and the last stage share {', '.join(sorted(shared))} (model.head.tie_embeddings)"
    return None


def _root_params(graph: Graph, indices: list[int]) -> set[str]:
    nodes = [graph.nodes[i] for i in indices]
    return {graph[ref.node].attr["name"] for node in nodes for ref in node.inputs if graph[ref.node].op == "param"}


class PipelineStage(nn.Module):
    """Blocks ``first..last`` of ``model``; with the prologue when ``first == 0``, the epilogue at the end."""

    def __init__(self, model: nn.Module, graph: Graph, first: int, last: int):
        super().__init__()
        cut = segments(graph)
        self.graph = graph
        self.root = [model]  # a plain list: the root's methods run here, its parameters are not registered again
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(first, last + 1)})
        self.block_segments = [s for s in cut if s.block is not None and first <= s.block <= last]
        self.is_first, self.is_last = first == 0, last == len(model.blocks) - 1
        self.prologue = cut[0].nodes if self.is_first and cut[0].block is None else []
        self.epilogue = _needed(graph, cut[-1].nodes, graph.outputs[0]) if self.is_last and cut[-1].block is None else []
        # The root modules this stage reads (embed; final_norm, head), registered under their own names, so the
        # stage's parameters carry the whole model's names (optimizer groups, checkpoints address them so).
        for owner in sorted({name.rsplit(".", 1)[0] for name in self._root_params()}):
            self.add_module(owner, model.get_submodule(owner))
        self.moe_layers = tuple(layer for segment in self.block_segments for layer in getattr(model, "MOE_LAYERS", ())
                                if layer.startswith(f"blocks.{segment.block}."))
        self.recorded: list[tuple] = []  # per training forward: the MoE stats of this stage's layers, in moe_layers order

    def _root_params(self) -> set[str]:
        return _root_params(self.graph, self.prologue + self.epilogue)

    def forward(self, x: torch.Tensor, aux_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """First stage: tokens -> (hidden, aux rows); later ones: (hidden, aux rows) -> (hidden, aux rows), the last
        (output, aux rows). The running aux sum travels as one copy per batch row: pipelining splits and merges every
        value along the batch (a 0-dim tensor would not concatenate); ``aux_rows[0]`` is the sum."""
        aux = None if aux_rows is None else aux_rows[0]
        hidden = x
        if self.is_first:
            hidden = self.root[0].embed_inputs(x)  # the program's own embedding (model.py's embed_inputs)
        stats = []
        for segment in self.block_segments:
            outputs = self.blocks[str(segment.block)](hidden)
            if isinstance(outputs, tuple):  # a model with MoE layers: every block returns (x, aux, stats)
                hidden, block_aux, block_stats = outputs
                aux = block_aux if aux is None else aux + block_aux
                stats += block_stats
            else:
                hidden = outputs
        if self.training and torch.is_grad_enabled():
            self.recorded.append(tuple(stats))
        aux = aux if aux is not None else hidden.new_zeros(())
        aux_rows = aux.float().repeat(x.shape[0])
        if not self.is_last:
            return hidden, aux_rows
        return self.root[0].predict(hidden), aux_rows  # the program's own final norm and head


def build_schedule(stages: list[PipelineStage], ranks: int, rank: int, group, device, kind: str, microbatches: int, loss_fn,
                   scale_grads: bool = True):
    """torch.distributed.pipelining's schedule for this rank's stage(s): stage ``rank`` (and ``rank + ranks``
    with interleaved 1F1B, which runs two virtual stages per rank). ``scale_grads``: the schedule divides the
    gradients by ``microbatches`` after each step (False: ``loss_fn`` scales its losses itself)."""
    from torch.distributed import pipelining

    total = ranks * len(stages)
    wrapped = [pipelining.PipelineStage(stage, rank + i * ranks, total, device, group=group) for i, stage in enumerate(stages)]
    schedule = getattr(pipelining, SCHEDULES[kind])
    held = wrapped if kind == "interleaved_1f1b" else wrapped[0]
    return schedule(held, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=scale_grads)


def _is_scalar(graph: Graph, ref: Ref) -> bool:
    types = graph[ref.node].types
    return bool(types) and types[ref.index].rank == 0


def _hidden(graph: Graph, segment) -> Ref | None:
    """A block's hidden-state output: its one output that is not a scalar."""
    hidden = [ref for ref in segment.outputs if not _is_scalar(graph, ref)]
    return hidden[0] if len(hidden) == 1 else None


def _sum_of(graph: Graph, ref: Ref, leaves: set[Ref]) -> bool:
    if ref in leaves:
        return True
    node = graph[ref.node]
    if node.op == "constant" and node.attr["value"] == 0.0:  # a model without aux losses (its stages send zeros)
        return True
    return node.op == "add" and all(_sum_of(graph, r, leaves) for r in node.inputs)


def _needed(graph: Graph, indices: list[int], output: Ref) -> list[int]:
    """The nodes of ``indices`` that ``output`` depends on, in order."""
    wanted, position = {output.node}, {graph.nodes[i].name: i for i in indices}
    for index in reversed(indices):
        node = graph.nodes[index]
        if node.name in wanted:
            wanted |= {ref.node for ref in node.inputs}
    return [i for i in indices if graph.nodes[i].name in wanted and graph.nodes[i].name in position]
