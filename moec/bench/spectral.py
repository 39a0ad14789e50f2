"""``moec bench`` for spectral MoE layers: against attention as the sequence grows, and the
sequence length where ``torch.fft`` overtakes the DFT as matmuls.

Each candidate is one generated block (its norm, the layer, the residual) of a one-block spec
at the spec's width, built for each sequence length (the spectral band table depends on it),
timed forward + backward on one sequence in interleaved repetitions (medians). Memory is what
autograd saves for backward during the forward (the activations a training step holds), summed
from ``saved_tensors_hooks``: measurable on the CPU, where there is no allocator peak counter.

- ``sweep``: the spec's spectral layer against an attention layer of the same width (``heads``
  of 16 channels each), sequences 256 -> 8192 by default; the growth exponent of each is the
  least-squares slope of log(time) over log(sequence).
- ``crossover``: the same spectral layer with ``kernels.spectral_moe: dft`` and ``fft``; the
  crossover is the shortest sequence from which the FFT is faster at every longer one measured.
  ``kernels.spectral_moe: auto`` uses the DFT up to ``codegen_moe.DFT_MAX_SEQ``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import moec
from moec.bench.timing import interleaved, prefixed

SWEEP_SEQS = (256, 512, 1024, 2048, 4096, 8192)
CROSSOVER_SEQS = (16, 32, 64, 128, 256, 512)
COMPILED = " compiled"  # the suffix of rows timed under torch.compile


@dataclass(frozen=True)
class SpectralRow:
    layer: str  # "model.blocks[0].layers[0]"
    seq: int
    name: str  # "spectral_moe", "attention", "spectral_moe dft", "spectral_moe fft"
    median_ms: float
    low_ms: float
    high_ms: float
    saved_mib: float  # activations saved for backward by one forward


def spectral_layers(spec) -> list[tuple[str, dict]]:
    """(where, the layer's own fields) per distinct spectral_moe layer."""
    seen, out = set(), []
    for b, i, layer in spec.model.layers():
        if layer.kind != "spectral_moe":
            continue
        fields = layer.model_dump(mode="json", exclude_unset=True)
        text = json.dumps(fields, sort_keys=True)
        if text not in seen:
            seen.add(text)
            out.append((f"model.blocks[{b}].layers[{i}]", fields))
    return out


def block_spec_text(layer: dict, width: int, seq: int, spectral_kernel: str = "auto") -> str:
    """A one-block spec on 1-D signals holding ``layer`` (a flow mapping) at ``width``."""
    return (f"version: 1\nname: bench_block\nmodel:\n  d_model: {width}\n  max_seq_len: {seq}\n"
            f"  inputs: {{kind: continuous, dims: 1}}\n  blocks:\n    - norm: {{kind: rmsnorm}}\n      layers:\n"
            f"        - {json.dumps(layer)}\n  head: {{kind: regression, pool: last}}\n"
            f"schedule: {{compile: {{enabled: false}}, kernels: {{spectral_moe: {spectral_kernel}}}}}\n"
            f"train: {{seed: 0, steps: 1, batch: 1, seq_len: {seq}, optimizer: {{lr: 1.0e-3}}, data: {{kind: signals}}}}\n")


def attention_layer(width: int) -> dict:
    return {"kind": "attention", "heads": max(1, width // 16)}


def block_step(spec_text: str, seq: int, width: int, device: torch.device,
               compiled: bool = False) -> tuple[Callable[[], None], Callable[[], int]]:
    """A forward + backward closure of the spec's block 0 on one (1, seq, width) input (under
    torch.compile when ``compiled``), and a function measuring the bytes that forward saves for backward."""
    spec = moec.load_spec_text(spec_text, "<bench block>")
    block = moec.build_model(spec, device=device).blocks[0].train()
    if compiled:
        block = torch.compile(block, fullgraph=True)
    torch.manual_seed(0)
    x = torch.randn(1, seq, width, device=device, requires_grad=True)
    grad = torch.randn(1, seq, width, device=device)

    def forward() -> torch.Tensor:
        outputs = block(x)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs  # a block without MoE returns its hidden state
        hidden = next(t for t in outputs if isinstance(t, torch.Tensor) and t.shape == x.shape)
        aux = sum(t for t in outputs if isinstance(t, torch.Tensor) and t.dim() == 0)
        return (hidden * grad).sum() + aux

    def step() -> None:
        block.zero_grad(set_to_none=True)
        x.grad = None
        forward().backward()

    def saved_bytes() -> int:
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
        return total[0]
    return step, saved_bytes


def time_blocks(texts: dict[str, str], seq: int, width: int, device: torch.device, reps: int,
                progress: Callable[[str], None] | None = None) -> dict[str, tuple]:
    """name -> (Timing, saved bytes) for blocks built from ``texts`` at one sequence length."""
    steps, saved = {}, {}
    for name, text in texts.items():
        steps[name], measure = block_step(text, seq, width, device, compiled=name.endswith(COMPILED))
        saved[name] = measure()
    inner = max(1, min(16, 2048 // seq))  # short sequences: several steps per sample
    return {t.name: (t, saved[t.name]) for t in interleaved(steps, device, reps, inner=inner, progress=progress)}


def sweep(spec, seqs=SWEEP_SEQS, reps: int = 5, device: str = "cpu", progress=None) -> list[SpectralRow]:
    width, dev = spec.model.d_model, torch.device(device)
    rows = []
    for where, layer in spectral_layers(spec):
        for seq in seqs:
            texts = {"spectral_moe": block_spec_text(layer, width, seq), "attention": block_spec_text(attention_layer(width), width, seq)}
            rows += _rows(where, seq, time_blocks(texts, seq, width, dev, reps, prefixed(progress, f"{where} at {seq}")))
    return rows


def crossover(spec, seqs=CROSSOVER_SEQS, reps: int = 5, device: str = "cpu", progress=None,
              compiled: bool = False) -> list[SpectralRow]:
    """The spectral block with each kernel, eager (and compiled: names ending in `` compiled``)."""
    width, dev = spec.model.d_model, torch.device(device)
    rows = []
    for where, layer in spectral_layers(spec):
        for seq in seqs:
            texts = {f"spectral_moe {kernel}{suffix}": block_spec_text(layer, width, seq, kernel)
                     for suffix in ("", COMPILED)[: 2 if compiled else 1] for kernel in ("dft", "fft")}
            rows += _rows(where, seq, time_blocks(texts, seq, width, dev, reps, prefixed(progress, f"{where} at {seq}")))
    return rows


def growth_exponent(rows: list[SpectralRow], name: str) -> float | None:
    """Least-squares slope of log(median time) over log(sequence) for candidate ``name``."""
    points = [(math.log(r.seq), math.log(r.median_ms)) for r in rows if r.name == name]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def crossover_seq(rows: list[SpectralRow], suffix: str = "") -> int | None:
    """The shortest measured sequence from which the FFT is faster than the DFT at every longer one
    (eager rows, or those whose names end in ``suffix``)."""
    by_seq: dict[int, dict[str, float]] = {}
    for r in rows:
        by_seq.setdefault(r.seq, {})[r.name] = r.median_ms
    faster = [(seq, t[f"spectral_moe fft{suffix}"] < t[f"spectral_moe dft{suffix}"]) for seq, t in sorted(by_seq.items())]
    found = None
    for seq, fft_wins in reversed(faster):
        if not fft_wins:
            break
        found = seq
    return found


def _rows(where: str, seq: int, timed: dict[str, tuple]) -> list[SpectralRow]:
    return [SpectralRow(where, seq, name, t.median_s * 1e3, t.low_s * 1e3, t.high_s * 1e3, saved / 2**20)
            for name, (t, saved) in timed.items()]
