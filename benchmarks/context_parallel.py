"""Context parallelism's memory and step time: cp 1, 2 and 4 on the same global sequence.

    python benchmarks/context_parallel.py [--seq 2048] [--steps 4] [--budget-mib 48] [--models attention spectral]

Each configuration is ``moec train``'s Trainer in its own processes (torchrun, gloo, CPU): cp 1
is one process, cp 2 / cp 4 split every sequence over 2 / 4 ranks (``sharding.sequence: [cp]``,
the load-balanced causal split). One global sequence of ``--seq`` tokens per step.

- peak: the most tensor bytes live at any moment of one training step (forward, backward,
  optimizer) above what was live before it (the weights, the optimizer state), on the rank
  that needed the most: torch's profiler with ``profile_memory``
  (:func:`moec.observe.cpu_memory.peak_allocated_bytes`). The process RSS cannot show this.
- step: the median wall time of ``--steps`` steps after two warm-up steps, rank 0.
- longest fit: doubling the sequence from 256 while the peak stays under ``--budget-mib``.

Models (d_model 64, 2 blocks): ``attention`` is GQA attention (4 heads, 2 KV heads) + MoE
(4 experts, top-2); ``spectral`` is a spectral MoE layer (rfft over the sequence, 4 experts,
top-2) + MoE with ``head.pool: last``, whose FFT under cp is the distributed transform
(all-to-all to channel-split, local rfft, all-to-all to frequency-split).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIXERS = {
    "attention": "        - kind: attention\n          heads: 4\n          kv_heads: 2\n",
    "spectral": ("        - kind: spectral_moe\n          moe:\n            experts: 4\n            top_k: 2\n"
                 "            expert: {hidden: 64, activation: gelu}\n"),
}

# a spectral layer mixes the whole sequence: it predicts from the last position only (per-position targets would leak)
HEADS = {"attention": "{kind: lm}", "spectral": "{kind: lm, pool: last}"}


def spec_text(model: str, seq: int, cp: int) -> str:
    mesh = f"mesh: {{world_size: {cp}, axes: {{cp: {cp}}}}}\nsharding: {{sequence: [cp]}}\n" if cp > 1 else ""
    return (f"version: 1\nname: cp_{model}\nmodel:\n  d_model: 64\n  max_seq_len: {seq}\n"
            f"  inputs: {{kind: tokens, vocab: 256}}\n  blocks:\n    - repeat: 2\n      layers:\n{MIXERS[model]}"
            f"        - kind: moe\n          experts: 4\n          top_k: 2\n          expert: {{hidden: 64, activation: swiglu}}\n"
            f"  head: {HEADS[model]}\n{mesh}schedule:\n  compile: {{enabled: false}}\n  deterministic: true\n"
            f"train:\n  seed: 0\n  steps: 100\n  batch: 1\n  seq_len: {seq}\n  optimizer: {{lr: 1.0e-3}}\n"
            f"  data: {{kind: text, files: [\"stdlib:**/*.py\"]}}\n  checkpoint: {{every: 0}}\n  eval: {{every: 0, batches: 1}}\n")


def worker(args) -> None:
    """One rank: two warm-up steps, the profiled step's peak, then the timed steps."""
    import torch.distributed

    import moec
    from moec.observe.cpu_memory import peak_allocated_bytes
    from moec.train.trainer import Trainer

    spec = moec.load_spec_text(spec_text(args.model, args.seq, args.cp), file=f"cp_{args.model}.yaml")
    trainer = Trainer(spec, run_dir=Path(args.out).parent / f"run_{os.environ.get('RANK', '0')}_{args.cp}_{args.seq}")
    for step in range(2):
        trainer._train_step(step)
    peak = peak_allocated_bytes(lambda: trainer._train_step(2))
    times = []
    for step in range(3, 3 + args.steps):
        start = time.perf_counter()
        trainer._train_step(step)
        times.append(time.perf_counter() - start)
    rank = int(os.environ.get("RANK", "0"))
    peaks = [peak]
    if torch.distributed.is_initialized():
        peaks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(peaks, peak)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"peak_bytes": max(peaks), "step_s": statistics.median(times)}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def measure(model: str, seq: int, cp: int, steps: int, work: Path) -> dict:
    out = work / f"{model}_{cp}_{seq}.json"
    command = [sys.executable, __file__, "--worker", "--model", model, "--seq", str(seq), "--cp", str(cp),
               "--steps", str(steps), "--out", str(out)]
    if cp > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(cp),
                   *command[1:]]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{model} cp {cp} seq {seq} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def longest_fit(model: str, cp: int, budget: int, steps: int, work: Path, longest: int) -> int:
    """The longest power-of-two sequence (from 256) whose step peak stays within ``budget`` bytes."""
    fit, seq = 0, 256
    while seq <= longest and measure(model, seq, cp, steps, work)["peak_bytes"] <= budget:
        fit, seq = seq, seq * 2
    return fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--models", nargs="+", default=list(MIXERS), choices=list(MIXERS))
    parser.add_argument("--budget-mib", type=float, default=48.0)
    parser.add_argument("--longest", type=int, default=16384, help="stop the fit search here")
    parser.add_argument("--no-fit", action="store_true", help="skip the longest-sequence search")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.cp = args.cp[0] if isinstance(args.cp, list) else args.cp
        return worker(args)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; one sequence of {args.seq} "
          f"tokens per step, 1 thread per rank; step: median of {args.steps} after 2 warm-up steps")
    print("| model | cp | peak per rank (MiB) | vs cp 1 | step (ms) |")
    print("| --- | --- | --- | --- | --- |")
    budget = int(args.budget_mib * 2**20)
    with tempfile.TemporaryDirectory() as tmp:
        fits = {}
        for model in args.models:
            base = None
            for cp in args.cp:
                row = measure(model, args.seq, cp, args.steps, Path(tmp))
                base = base or row["peak_bytes"]
                print(f"| {model} | {cp} | {row['peak_bytes'] / 2**20:.1f} | {row['peak_bytes'] / base:.2f} | "
                      f"{row['step_s'] * 1e3:.0f} |", flush=True)
            if not args.no_fit:
                fits[model] = {cp: longest_fit(model, cp, budget, 1, Path(tmp), args.longest) for cp in (args.cp[0], args.cp[-1])}
        for model, by_cp in fits.items():
            print(f"longest sequence within {args.budget_mib:g} MiB per rank, {model}: "
                  + ", ".join(f"cp {cp}: {seq}" for cp, seq in by_cp.items()))


if __name__ == "__main__":
    main()
