"""Time from launching ``moec train SPEC`` to its first logged training step: cold, warm, and
warm from moec's saved compile artifacts alone (a fresh Inductor cache, as on a new machine).

    python benchmarks/warm_start.py [specs/token_routed_tiny.yaml]

Each start is a new process with ``MOEC_CACHE_DIR`` and ``TORCHINDUCTOR_CACHE_DIR`` pointed at
fresh folders (cold), the same folders again (warm), or the same MOEC_CACHE_DIR with an
empty Inductor cache (portable). The clock stops when metrics.jsonl gets its first row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def time_to_step_one(spec: str, moec_cache: Path, inductor_cache: Path, run_dir: Path) -> float:
    env = dict(os.environ, MOEC_CACHE_DIR=str(moec_cache), TORCHINDUCTOR_CACHE_DIR=str(inductor_cache))
    metrics = run_dir / "metrics.jsonl"
    start = time.perf_counter()
    command = [sys.executable, "-c", "from moec.cli.main import main; main()", "train", spec, "--stop-at", "2", "--no-plots",
               "--run-dir", str(run_dir)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None:
        if metrics.exists() and any(json.loads(line).get("kind") == "train" for line in metrics.read_text().splitlines() if line):
            elapsed = time.perf_counter() - start
            process.wait()  # let it save its caches and exit
            return elapsed
        time.sleep(0.05)
    raise SystemExit(f"moec train exited with {process.returncode} before step 1:\n{process.stderr.read()[-2000:]}")


def main() -> None:
    spec = sys.argv[1] if len(sys.argv) > 1 else "specs/token_routed_tiny.yaml"
    root = Path(tempfile.mkdtemp(prefix="moec-warm-start-"))
    moec_cache, first, fresh = root / "moec", root / "inductor", root / "inductor-fresh"
    cold = time_to_step_one(spec, moec_cache, first, root / "run1")
    warm = time_to_step_one(spec, moec_cache, first, root / "run2")
    portable = time_to_step_one(spec, moec_cache, fresh, root / "run3")
    print(f"{spec}: time to step 1  cold {cold:.1f} s   warm {warm:.1f} s   "
          f"warm from moec's compile artifacts only (empty Inductor cache) {portable:.1f} s")


if __name__ == "__main__":
    main()
