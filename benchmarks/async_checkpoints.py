"""The training stall per checkpoint, synchronous against asynchronous (``train.checkpoint.async``), and the
wall time of a run that checkpoints every ``EVERY`` steps.

    python benchmarks/async_checkpoints.py [STEPS] [EVERY]      # default 100 steps, a checkpoint every 10

The model is token_routed_tiny widened until its checkpoint (weights + AdamW moments, fp32) passes
300 MB: d_model 512, 8 experts of hidden 2048, one block (26.2 M parameters, 315 MB of
state), trained on random tokens with a small batch so the checkpoints, not the steps, dominate.
Each mode runs in a process of its own; the stall is the ``time_s.checkpoint`` moec writes into
metrics.jsonl (the whole write, or staging the copy), the wall time is the run's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

WIDE = ["model.d_model=512", "model.blocks[0].repeat=1", "model.blocks[0].layers[1].experts=8",
        "model.blocks[0].layers[1].expert.hidden=2048", "schedule.compile.enabled=false", "train.data={kind: random_tokens}",
        "train.batch=2", "train.seq_len=32", "train.lr_schedule.warmup_steps=5", "train.eval.every=0", "train.eval.batches=1",
        "train.checkpoint.keep_last=2", "train.checkpoint.keep_best=false"]

RUN = """
import json, sys
from pathlib import Path
import moec
from moec.train.trainer import Trainer
spec = moec.load_spec("specs/token_routed_tiny.yaml", overrides=json.loads(sys.argv[1]))
result = Trainer(spec, run_dir=Path(sys.argv[2])).run()
print(json.dumps({"seconds": result.seconds}))
"""


def run(mode: str, steps: int, every: int, root: Path) -> dict:
    overrides = WIDE + [f"train.steps={steps}", f"train.checkpoint.every={every}", f"train.checkpoint.async={mode == 'async'}".lower()]
    run_dir = root / mode
    done = subprocess.run([sys.executable, "-c", RUN, json.dumps(overrides), str(run_dir)], capture_output=True, text=True, check=True)
    seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    stalls = [row["time_s"]["checkpoint"] for row in rows if row["kind"] == "train" and row["time_s"]["checkpoint"] > 0]
    state = sum(f.stat().st_size for f in next((run_dir / "checkpoints").glob("step_*")).iterdir())
    return {"mode": mode, "wall_s": seconds, "stalls_s": stalls, "checkpoint_bytes": state}


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    every = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    root = Path(tempfile.mkdtemp(prefix="moec-async-ckpt-"))
    for mode in ("sync", "async"):
        got = run(mode, steps, every, root)
        stalls = got["stalls_s"]
        print(f"{mode:5}  {steps} steps, a checkpoint every {every} ({got['checkpoint_bytes'] / 1e6:.0f} MB): wall {got['wall_s']:.1f} s; "
              f"stall per checkpoint (the {len(stalls)} that a later step waited on) median {sorted(stalls)[len(stalls) // 2]:.2f} s, "
              f"max {max(stalls):.2f} s")


if __name__ == "__main__":
    main()
