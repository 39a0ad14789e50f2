"""``moec inspect``: the moe_basics seed's report for one MoE layer of any spec.

The layer's generated function (the same code ``moec train`` runs) is called on a random
``[B, S, D]`` input (normal, seeded by ``train.seed``; token ids for a ``token_id`` router)
with the layer's weights, from the spec seed or a checkpoint. Reported: the shapes of the
input, the router logits, the expert assignments and the output, the forward time (eager,
median of repeated calls), the tokens routed to each expert (before capacity drops, as a
share of the tokens: the shares add up to top_k) and the layer's weighted load-balance term.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moec.moe import ROUTERS

TIMED_CALLS = 5  # after one warm-up call


class InspectError(ValueError):
    """A layer or input size the report cannot serve (one line for the CLI)."""


@dataclass
class LayerReport:
    name: str
    width: int
    hidden: int
    experts: int
    top_k: int
    batch: int
    seq: int
    output_shape: tuple[int, ...]
    time_ms: float
    counts: list[int]
    load_balance: float
    load_balance_weight: float

    def lines(self) -> list[str]:
        B, S, E = self.batch, self.seq, self.experts
        tokens = B * S
        lines = [
            f"MoE Layer Configuration ({self.name}):",
            f"  - Hidden Dim: {self.width}",
            f"  - Expert FFN Dim: {self.hidden}",
            f"  - Num Experts: {E}",
            f"  - Top-k: {self.top_k}",
            f"  - Batch Size: {B}, Sequence Length: {S}",
            "",
            "Forward Pass:",
            f"  - Input: [{B}, {S}, {self.width}]",
            f"  - Router Logits: [{B}, {S}, {E}]",
            f"  - Expert Assignments: [{B}, {S}, {self.top_k}]",
            f"  - Output: [{', '.join(map(str, self.output_shape))}]",
            f"  - Time: {self.time_ms:.1f}ms",
            "",
            "Expert Load Distribution:",
        ]
        lines += [f"  Expert {e}: {count} tokens ({100 * count / tokens:.1f}%)" for e, count in enumerate(self.counts)]
        lines.append(f"  Load Balance Loss: {self.load_balance:.4f} (aux.load_balance {self.load_balance_weight:g})")
        return lines


def moe_layer_names(program) -> list[str]:
    return [name for name, _ in program.moe_layers()]


def inspect_layer(spec, layer: str | None = None, tokens: int | None = None, checkpoint: Path | None = None) -> LayerReport:
    """The report of MoE layer ``layer`` (default: the first) on ``tokens`` random tokens (default: train.seq_len)."""
    from moec.compile import build_model, compile_spec

    program = compile_spec(spec)
    nodes = [node for node in program.graph.nodes if node.op in ("moe", "spectral_moe")]
    names = moe_layer_names(program)
    if not names:
        raise InspectError(f"{spec.name} has no MoE layer")
    name = layer or names[0]
    if name not in names:
        raise InspectError(f"no MoE layer {name!r}; the layers are {', '.join(names)}")
    node = nodes[names.index(name)]
    if node.op != "moe":
        raise InspectError(f"{name} is a spectral_moe layer; inspect reports token-routed moe layers")
    batch, seq = _input_size(spec, tokens)
    model = build_model(spec, program=program).eval()
    if checkpoint is not None:
        _load(model, checkpoint)
    layer_module = model.get_submodule(name)  # the generated MoE class: forward(h) or forward(h, token ids)
    args = _arguments(spec, node, batch, seq)
    with torch.no_grad():
        out, _, *rest = layer_module(*args)
        stats = rest[-1]
        times = []
        for _ in range(TIMED_CALLS):
            start = time.perf_counter()
            layer_module(*args)
            times.append((time.perf_counter() - start) * 1e3)
    moe = node.attr["moe"]
    w_down = layer_module.get_parameter("experts.w_down")  # [E, D, H]
    return LayerReport(name=name, width=args[0].shape[-1], hidden=w_down.shape[2], experts=moe.experts, top_k=moe.top_k, batch=batch,
                       seq=seq, output_shape=tuple(out.shape), time_ms=statistics.median(times), counts=[int(count) for count in stats.counts.tolist()],
                       load_balance=stats.load_balance.item(), load_balance_weight=0.0 if moe.aux.pooled else moe.aux.load_balance)


def _input_size(spec, tokens: int | None) -> tuple[int, int]:
    seq_len = spec.train.seq_len
    tokens = tokens or seq_len
    seq = min(tokens, seq_len)
    if tokens % seq:
        raise InspectError(f"--tokens {tokens} must be at most train.seq_len ({seq_len}) or a multiple of it")
    return tokens // seq, seq


def _arguments(spec, node, batch: int, seq: int) -> list[torch.Tensor]:
    """The layer's inputs: h normal, and the token ids when a token-id router reads them."""
    generator = torch.Generator().manual_seed(spec.train.seed)
    h = torch.randn(batch, seq, spec.model.d_model, generator=generator)
    if ROUTERS[node.attr["moe"].router.kind].learned:
        return [h]
    return [h, torch.randint(0, spec.model.inputs.vocab, (batch, seq), generator=generator)]


def _load(model, path: Path) -> None:
    from moec.checkpoint import dcp as ckpt

    if not path.exists():
        raise InspectError(f"--checkpoint {path}: no such file or checkpoint directory")
    if path.is_dir():
        ckpt.load_model_state(path, model)
    else:
        from moec.interop.weights import load_weights

        load_weights(model, path)
