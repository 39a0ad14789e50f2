"""Training step time on 1, 2 and 4 processes of the same spec and global batch, and the
expert-parallel all-to-all's bytes against an all-gather of every token.

    python benchmarks/distributed_steps.py [--steps 12 --rounds 3]

The model is token_routed_tiny's (2 blocks, d_model 64, 4 experts, top-2), eager, on the CPU
with gloo. Configurations: 1 process; ep 2 (2 processes); dp 2 x ep 2 (4 processes); fsdp 2 x
ep 2 (4 processes). Each round runs every configuration once (interleaved), ``moec train`` in
its own processes; a configuration's figure is the median over rounds of its median step time
after the first 2 steps (warm-up). The step time is rank 0's wall time of a whole step.

Bytes: ``expert_parallel_bytes_sent`` is what the all-to-alls sent off-rank per step (forward
and backward, summed over ranks). The dense alternative all-gathers every token of the ep group to
each of its ranks in each MoE layer and reduce-scatters the outputs back (the backward does
the same again): ``layers x 4 x P x (P - 1) x local_tokens x d_model x 4`` bytes per ep group
of P ranks.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MESHES = {
    "1 process": ("", 1),
    "ep 2": ("mesh: {world_size: 2, axes: {ep: 2}}\nsharding: {batch: [ep], experts: [ep]}\n", 2),
    "dp 2 x ep 2": ("mesh: {world_size: 4, axes: {dp: 2, ep: 2}}\nsharding: {batch: [dp, ep], experts: [ep]}\n", 4),
    "fsdp 2 x ep 2": ("mesh: {world_size: 4, axes: {fsdp: 2, ep: 2}}\n"
                      "sharding: {batch: [fsdp, ep], fsdp: [fsdp, ep], experts: [ep]}\n", 4),
}
D_MODEL, LAYERS, BATCH, SEQ = 64, 2, 16, 128


def spec_text(mesh: str, steps: int) -> str:
    text = (REPO / "specs" / "token_routed_tiny.yaml").read_text()
    head, _, _ = text.partition("\nmesh:")
    if "\nmesh:" not in text:
        head = text.partition("\nschedule:")[0]
    return (f"{head}\n{mesh}schedule:\n  compile: {{enabled: false}}\n  deterministic: true\n"
            f"train:\n  seed: 0\n  steps: {steps}\n  batch: {BATCH}\n  seq_len: {SEQ}\n  optimizer: {{lr: 3.0e-3}}\n"
            f"  lr_schedule: {{warmup_steps: 2}}\n  data: {{kind: text, files: [\"stdlib:json/*.py\"]}}\n"
            f"  checkpoint: {{every: 0}}\n  eval: {{every: 0, batches: 1}}\n")


def run(name: str, steps: int, work: Path) -> list[dict]:
    mesh, nproc = MESHES[name]
    spec = work / f"{name.replace(' ', '_')}.yaml"
    spec.write_text(spec_text(mesh, steps))
    run_dir = work / spec.stem
    command = [str(Path(sys.executable).parent / "moec"), "train", str(spec), "--run-dir", str(run_dir), "--no-plots"]
    command += ["--nproc", str(nproc)] if nproc > 1 else []
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=900)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    return [row for row in rows if row["kind"] == "train"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in MESHES}
    sent: dict[str, list[int]] = {name: [] for name in MESHES}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in MESHES:
                rows = run(name, args.steps, Path(tmp))[2:]
                times[name].append(statistics.median(BATCH * SEQ / row["tokens_per_s"] for row in rows))
                sent[name] += [row.get("expert_parallel_bytes_sent", 0) for row in rows]
                print(f"round {round_ + 1}: {name}: {times[name][-1] * 1000:.0f} ms/step", file=sys.stderr)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.rounds} interleaved rounds of {args.steps} steps, global batch {BATCH} x {SEQ} tokens")
    print("| configuration | step time (ms) | tokens/s | vs 1 process | all-to-all bytes/step | all-gather bytes/step | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = statistics.median(times["1 process"])
    for name, (_, nproc) in MESHES.items():
        step = statistics.median(times[name])
        a2a = statistics.median(sent[name]) if nproc > 1 else 0
        ep = 2 if nproc > 1 else 1
        local = BATCH * SEQ // nproc
        gather = LAYERS * 4 * ep * (ep - 1) * local * D_MODEL * 4 * (nproc // ep) if nproc > 1 else 0
        ratio = f"{a2a / gather:.2f}" if gather else "-"
        print(f"| {name} | {step * 1000:.0f} | {BATCH * SEQ / step:,.0f} | {base / step:.2f}x | {a2a:,.0f} | {gather:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
