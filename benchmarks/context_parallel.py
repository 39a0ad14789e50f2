"""Context parallelism (``sharding.sequence``): peak memory per rank and step time at cp 1, 2 and 4 on the
same global sequence, for an attention model and a spectral MoE model, and the longest sequence that fits a
fixed per-process memory budget at cp 1 against cp 4.

    python benchmarks/context_parallel.py [--seq 1024 --seq 4096] [--budget-mib 256] [--reps 3] [--json out.json]

Models (eager, fp32, CPU, gloo): ``attention``: 2 blocks of GQA attention (4 heads, 2 KV heads) + a top-2-of-4
MoE, d_model 64, a prediction at every position; ``spectral``: 2 blocks of a spectral MoE (depth 2, top-2 of 4
experts, torch.fft) + an MLP, d_model 64, ``head.pool: last``. Batch 1. Each configuration runs in cp spawned
processes that build the generated model and apply the generated parallel.py (the real program), then for
each sequence length one forward + backward (the gradient reduction included) under torch's profiler: the peak
is the most tensor bytes live at once on a rank above what the model held before (activations, gradients,
the exchanges' buffers; ``moec.observe.cpu_memory``), the largest over the ranks. The step time is the median
of ``--reps`` timed steps after one warm-up, rank 0's wall time.

The budget sweep doubles the sequence from 256 while the peak per rank stays within ``--budget-mib``, at cp 1
and cp 4, and reports the longest that fits. On a shared machine the times are noisy; the peaks are not.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAYERS = {
    "attention": ("""        - {kind: attention, heads: 4, kv_heads: 2}
        - kind: moe
          experts: 4
          top_k: 2
          expert: {hidden: 128, activation: swiglu}
          aux: {load_balance: 0.01}""", "{kind: lm}"),
    "spectral": ("""        - kind: spectral_moe
          depth: 2
          moe:
            experts: 4
            top_k: 2
            expert: {hidden: 128, activation: swiglu}
            aux: {load_balance: 0.01}
        - {kind: mlp, hidden: 128}""", "{kind: lm, pool: last}"),
}


def spec_text(kind: str, cp: int, max_seq: int) -> str:
    layers, head = LAYERS[kind]
    mesh = f"mesh: {{world_size: {cp}, axes: {{cp: {cp}}}}}\nsharding: {{sequence: [cp]}}\n" if cp > 1 else ""
    return f"""version: 1
name: cp_bench
model:
  d_model: 64
  max_seq_len: {max_seq}
  inputs: {{kind: tokens, vocab: 256}}
  blocks:
    - repeat: 2
      layers:
{layers}
  head: {head}
{mesh}schedule:
  compile: {{enabled: false}}
{"  kernels: {spectral_moe: fft}" + chr(10) if kind == "spectral" else ""}train:
  seed: 0
  steps: 1
  batch: 1
  seq_len: {max_seq}
  optimizer: {{lr: 1.0e-3}}
  data: {{kind: random_tokens}}
"""


def forward_backward(model, tokens) -> None:
    """One step's forward and backward (parallel.py's DDP reduces the gradients in it); the gradients dropped."""
    out = model(tokens)
    (out.output.float().square().mean() + out.aux_loss).backward()
    model.zero_grad(set_to_none=True)


def worker(rank: int, kind: str, cp: int, seqs: list[int], reps: int, port: int, results) -> None:
    import torch
    import torch.distributed as dist

    import moec
    from moec.compile import build_model, parallel_module
    from moec.distributed.processes import DistContext, local_slice
    from moec.observe.cpu_memory import peak_allocated_bytes

    torch.manual_seed(0)
    spec = moec.load_spec_text(spec_text(kind, cp, max(seqs)), file="cp_bench.yaml")
    program = moec.compile_spec(spec)
    mesh = None
    if cp > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(cp))
        dist.init_process_group("gloo", rank=rank, world_size=cp)
        mesh = parallel_module(program).make_mesh("cpu")
    model = build_model(spec, program=program, mesh=mesh)
    where = DistContext(world_size=cp, cp_rank=rank, cp_size=cp)
    try:
        for seq in seqs:
            tokens = local_slice(torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(seq)), where)
            step = functools.partial(forward_backward, model, tokens)
            step()  # warm-up
            peak = peak_allocated_bytes(step)
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                step()
                if cp > 1:
                    dist.barrier()
                times.append(time.perf_counter() - start)
            if cp > 1:
                peaks = [torch.zeros((), dtype=torch.int64) for _ in range(cp)]
                dist.all_gather(peaks, torch.tensor(peak))
                peak = max(int(p) for p in peaks)
            if rank == 0:
                results[(kind, cp, seq)] = {"kind": kind, "cp": cp, "seq": seq, "peak_bytes_per_rank": peak,
                                            "step_s": statistics.median(times)}
    finally:
        if cp > 1:
            dist.destroy_process_group()


def measure(kind: str, cp: int, seqs: list[int], reps: int) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(worker, args=(kind, cp, seqs, reps, port, results), nprocs=cp, start_method="spawn", join=True)
        return [results[(kind, cp, seq)] for seq in seqs if (kind, cp, seq) in results]


def longest_within(kind: str, cp: int, budget: int, reps: int, limit: int) -> int | None:
    """The longest of 256, 512, ... (up to ``limit``) whose peak per rank is within ``budget`` bytes."""
    best, seq = None, 256
    while seq <= limit:
        row = measure(kind, cp, [seq], reps)[0]
        if row["peak_bytes_per_rank"] > budget:
            break
        best, seq = seq, seq * 2
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, action="append", help="global sequence lengths (default 1024, 4096)")
    parser.add_argument("--cp", type=int, action="append", help="context-parallel sizes (default 1, 2, 4)")
    parser.add_argument("--kind", choices=sorted(LAYERS), action="append", help="models (default both)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget-mib", type=float, default=256.0, help="per-process budget of the sweep; 0: no sweep")
    parser.add_argument("--sweep-limit", type=int, default=65536, help="the longest sequence the sweep tries")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    seqs, sizes, kinds = args.seq or [1024, 4096], args.cp or [1, 2, 4], args.kind or sorted(LAYERS)
    rows = []
    print(f"{'model':10} {'cp':>3} {'seq':>7} {'peak MiB/rank':>14} {'step s':>8}")
    for kind in kinds:
        for cp in sizes:
            for row in measure(kind, cp, seqs, args.reps):
                rows.append(row)
                print(f"{kind:10} {cp:>3} {row['seq']:>7} {row['peak_bytes_per_rank'] / 2**20:>14.2f} {row['step_s']:>8.3f}")
    fits = {}
    if args.budget_mib > 0:
        budget = int(args.budget_mib * 2**20)
        for kind in kinds:
            for cp in (1, 4):
                fits[f"{kind} cp {cp}"] = longest_within(kind, cp, budget, 1, args.sweep_limit)
                print(f"{kind:10} cp {cp}: longest sequence within {args.budget_mib:g} MiB per process: {fits[f'{kind} cp {cp}']}")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows,
                                         "budget_mib": args.budget_mib, "longest_within_budget": fits}, indent=1))


if __name__ == "__main__":
    main()
