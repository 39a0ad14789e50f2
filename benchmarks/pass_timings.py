"""Time lowering + every pass for each bundled spec (median of N runs).

    python benchmarks/pass_timings.py [--runs 5]

Prints one row per spec: node counts before / after fusion and the median milliseconds of
lowering + all passes (verification after each pass included), and of each pass.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import moec
from moec.passes import run_pipeline

SPECS = sorted(Path(__file__).resolve().parent.parent.joinpath("specs").glob("*.yaml"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}, median of {args.runs} runs")
    print(f"{'spec':<20} {'nodes':>12} {'total ms':>9}  per pass (ms)")
    for path in SPECS:
        spec = moec.load_spec(path)
        totals, per_pass = [], {}
        for _ in range(args.runs):
            start = time.perf_counter()
            compiled = run_pipeline(spec)
            totals.append((time.perf_counter() - start) * 1e3)
            for record in compiled.log:
                per_pass.setdefault(record.name, []).append(record.seconds * 1e3)
        nodes = f"{len(compiled.unfused)}->{len(compiled.graph)}"
        passes = " ".join(f"{name}={statistics.median(ms):.1f}" for name, ms in per_pass.items())
        print(f"{path.stem:<20} {nodes:>12} {statistics.median(totals):>9.1f}  {passes}")


if __name__ == "__main__":
    main()
