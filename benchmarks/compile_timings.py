"""Compile time and eager-vs-compiled step time of a spec's generated model on this machine.

    python benchmarks/compile_timings.py specs/token_routed_tiny.yaml [--batch 8 --seq 128 --steps 20]

A step is forward + backward of ``exp(output).mean() + aux_loss``. Prints the cold compile
time (first compiled step), then the median step time eager and compiled, and their ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import moec


def step_times(model, step, inputs, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = step(*inputs)
        (out.output.exp().mean() + out.aux_loss).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    spec = moec.load_spec(args.spec)
    model = moec.build_model(spec).train()
    inputs = model.example_inputs(batch=args.batch, seq=args.seq)
    eager = statistics.median(step_times(model, model, inputs, args.steps))
    compiled = torch.compile(model, fullgraph=True)
    cold = step_times(model, compiled, inputs, 1)[0]
    warm = statistics.median(step_times(model, compiled, inputs, args.steps))
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{spec.name}, batch {args.batch} x seq {args.seq}, fwd+bwd, median of {args.steps}")
    print(f"cold compile (first compiled step): {cold:.1f} s")
    print(f"eager step: {eager * 1e3:.2f} ms   compiled step: {warm * 1e3:.2f} ms   eager/compiled: {eager / warm:.2f}x")


if __name__ == "__main__":
    main()
