"""The token_files data path alone: tokens/s and resident memory against the file's size.

    python benchmarks/token_files_data.py [--mb 200 1024] [--batch 8 --seq 1024 --batches 400]

For each size, writes a file of uint16 ids in a temporary directory, then in a fresh process
builds the dataset and draws ``--batches`` training batches (what the training loop asks for:
``batch("train", index, batch)``). Prints tokens/s (median of 3 passes over different batch
indices) and the growth of resident memory (anonymous and file-backed, from /proc/self/status)
from before the dataset was built to after the last batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import json, statistics, sys, time
from moec.data.token_files import TokenFiles

def rss():
    fields = dict(line.split(":") for line in open("/proc/self/status") if line.startswith(("Rss", "VmHWM")))
    return {key: int(value.split()[0]) * 1024 for key, value in fields.items()}

path, batch, seq, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
before = rss()
data = TokenFiles(0, seq, False, [path], [path], "uint16", 65536)
rates = []
for attempt in range(3):
    start = time.perf_counter()
    for index in range(attempt * batches, (attempt + 1) * batches):
        data.batch("train", index, batch)
    rates.append(batches * batch * seq / (time.perf_counter() - start))
after = rss()
print(json.dumps({"tokens_per_s": statistics.median(rates), "grew": {k: after[k] - before[k] for k in after}}))
"""


def write_tokens(path: Path, megabytes: int) -> None:
    chunk = (np.arange(1 << 22) % 50000).astype(np.uint16)  # 8 MiB
    with open(path, "wb") as handle:
        for _ in range(megabytes // 8):
            chunk.tofile(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[200, 1024])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=400)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; batch {args.batch} x seq {args.seq}")
    with tempfile.TemporaryDirectory() as tmp:
        for megabytes in args.mb:
            path = Path(tmp) / f"tokens_{megabytes}.bin"
            write_tokens(path, megabytes)
            done = subprocess.run([sys.executable, "-c", PROBE, str(path), str(args.batch), str(args.seq), str(args.batches)],
                                  cwd=REPO, capture_output=True, text=True, check=True,
                                  env=os.environ | {"PYTHONPATH": str(REPO)})
            result = json.loads(done.stdout)
            grew = result["grew"]
            print(f"{path.stat().st_size / 2**20:7.0f} MiB file: {result['tokens_per_s'] / 1e6:6.2f} M tokens/s, "
                  f"resident memory grew {grew['RssAnon'] / 2**20:.1f} MiB anonymous + {grew['RssFile'] / 2**20:.1f} MiB "
                  f"file-backed (peak {grew['VmHWM'] / 2**20:+.1f} MiB)")
            path.unlink()


if __name__ == "__main__":
    main()
