"""The reference interpreter: executes a graph node by node in eager PyTorch.

It is the ground truth every optimised backend is tested against. Parameters live in an
``nn.Module`` tree whose state_dict keys are the graph's parameter names, initialised
deterministically from the spec seed (see :func:`init_parameter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moec.backends.init import init_parameter
from moec.backends.output import ModelOutput
from moec.backends.reference import dense, fused, routing
from moec.ir.graph import Graph, Node

KERNELS = {**dense.KERNELS, **routing.KERNELS, **fused.KERNELS}


@dataclass
class Context:
    training: bool
    device: torch.device
    symbols: dict[str, int]


class ReferenceModel(nn.Module):
    """``forward(inputs) -> ModelOutput(output, aux_loss, mtp_logits)`` by interpreting ``graph``."""

    def __init__(self, graph: Graph, seed: int, device="cpu"):
        super().__init__()
        self.graph = graph
        self._holders: dict[str, tuple[nn.Module, str]] = {}
        for node in graph.params():
            value = init_parameter(node, seed, device)
            holder, leaf = self._holder(node.attr["name"])
            if node.attr["trainable"]:
                holder.register_parameter(leaf, nn.Parameter(value))
            else:
                holder.register_buffer(leaf, value)
            self._holders[node.name] = (holder, leaf)
        self.input_node = next(node for node in graph.nodes if node.op == "input")

    def _holder(self, dotted: str) -> tuple[nn.Module, str]:
        """The (sub)module that owns ``a.b.c``, creating ``a`` and ``a.b`` as needed."""
        *path, leaf = dotted.split(".")
        module: nn.Module = self
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        return module, leaf

    def example_inputs(self, batch: int = 2, seq: int = 16, seed: int = 0) -> tuple[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        attrs = self.input_node.attr
        device = next(iter(self.state_dict().values())).device
        if attrs["dtype"] == "i64":
            vocab = self.state_dict()["embed.weight"].shape[0]
            return (torch.randint(0, vocab, (batch, seq), generator=generator).to(device),)
        return (torch.randn((batch, seq, attrs["shape"][2]), generator=generator).to(device),)

    def forward(self, inputs: torch.Tensor) -> ModelOutput:
        ctx = Context(training=self.training, device=inputs.device, symbols={"B": inputs.shape[0], "S": inputs.shape[1]})
        values: dict[str, tuple] = {}
        for node in self.graph.nodes:
            values[node.name] = self._run(node, ctx, values, inputs)
        prediction, aux, *mtp = (values[ref.node][ref.index] for ref in self.graph.outputs)
        if not mtp or not self.training:  # multi-token prediction runs in training only
            return ModelOutput(output=prediction, aux_loss=aux)
        *logits, mtp_aux = mtp  # multi-token prediction: the depths' logits, their blocks' aux losses
        return ModelOutput(output=prediction, aux_loss=aux + mtp_aux, mtp_logits=tuple(logits))

    def _run(self, node: Node, ctx: Context, values: dict, inputs: torch.Tensor) -> tuple:
        if node.op == "input":
            return (inputs,)
        if node.op == "param":
            holder, leaf = self._holders[node.name]
            return (getattr(holder, leaf),)
        args = [values[ref.node][ref.index] for ref in node.inputs]
        result = KERNELS[node.op](ctx, node.attr, *args)
        return result if isinstance(result, tuple) else (result,)


def first_nonfinite(model: ReferenceModel, inputs: torch.Tensor) -> Node | None:
    """The first computed node (in execution order) whose output holds a NaN or an infinity."""
    ctx = Context(training=False, device=inputs.device, symbols={"B": inputs.shape[0], "S": inputs.shape[1]})
    values: dict[str, tuple] = {}
    with torch.no_grad():
        for node in model.graph.nodes:
            values[node.name] = model._run(node, ctx, values, inputs)
            if node.op != "param" and any(torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all() for v in values[node.name]):
                return node
    return None
