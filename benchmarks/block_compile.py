"""Compile time of a model whose blocks are compiled one by one (as ``moec train`` does under data
parallelism, and torchtitan for every model): how many graphs Dynamo builds, and the cold first step.

    python benchmarks/block_compile.py [--spec specs/token_routed_tiny.yaml] [--blocks 8] [--baseline OLD/model.py]

Each block's ``forward`` is wrapped in ``torch.compile`` and one forward + backward runs, in a fresh
process per program (compile caches are per process: the second program would find the first's). A
program with one class per distinct block compiles one graph for all blocks of a class; one with a
class per block compiles a graph per block. ``--baseline``: a model.py built by another moec from the
same spec with ``model.blocks[0].repeat=BLOCKS`` (its weights are this program's: the same names).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
import moec
from moec.backends.torch.loader import load_program

spec = moec.load_spec(sys.argv[1], [f"model.blocks[0].repeat={sys.argv[2]}"])
model = moec.build_model(spec).train()
if sys.argv[3]:
    other = load_program(open(sys.argv[3]).read(), sys.argv[3] + ".loaded.py").Model()
    other.load_state_dict(model.state_dict())
    model = other.train()
for block in model.blocks:
    block.forward = torch.compile(block.forward, fullgraph=True)
tokens = torch.randint(0, spec.model.inputs.vocab, (spec.train.batch, spec.train.seq_len), generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
out = model(tokens)
(out.output.float().square().mean() + out.aux_loss).backward()
cold = time.perf_counter() - start
start = time.perf_counter()
out = model(tokens)
(out.output.float().square().mean() + out.aux_loss).backward()
warm = time.perf_counter() - start
from torch._dynamo.utils import counters
print(json.dumps({"cold_s": cold, "warm_s": warm, "graphs": counters["stats"]["unique_graphs"],
                  "loss": float(out.output.float().square().mean())}))
"""


def run(spec: str, blocks: int, baseline: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, spec, str(blocks), baseline], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/token_routed_tiny.yaml")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--reps", type=int, default=2, help="fresh processes per program, alternating")
    args = parser.parse_args()
    programs = {"this program": ""} | ({"baseline": str(args.baseline)} if args.baseline else {})
    rows: dict[str, list[dict]] = {name: [] for name in programs}
    for _ in range(args.reps):
        for name, path in programs.items():
            rows[name].append(run(args.spec, args.blocks, path))
    print(f"# {args.spec}, {args.blocks} blocks, each block's forward compiled (fullgraph); {args.reps} fresh processes each")
    for name, runs in rows.items():
        cold = sorted(r["cold_s"] for r in runs)[len(runs) // 2]
        warm = sorted(r["warm_s"] for r in runs)[len(runs) // 2]
        print(f"  {name:13s} graphs {runs[0]['graphs']:3d}  cold first step {cold:6.1f} s  warm step {warm * 1e3:7.1f} ms  "
              f"loss {runs[0]['loss']:.6f}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"  ({time.perf_counter() - started:.0f} s)")
