"""Start-up costs of a spec (``moec bench SPEC --startup``): building the program, and the first
training step of the whole model in a new process with cold and then warm compile caches.

Each start is a child process (``python -m moec.bench.startup``) with ``MOEC_CACHE_DIR`` and
``TORCHINDUCTOR_CACHE_DIR`` pointed at a fresh folder (cold) and then at the same folder again
(warm); it builds the model, compiles it the way ``moec train`` does on one process (ahead of
time, then lazily for inputs the saved function does not cover) and times one forward +
backward on random inputs of the spec's batch and sequence length. The import of torch and
the data pipeline are outside the clock: ``benchmarks/warm_start.py`` times the whole command.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StartupRow:
    name: str  # "build", "first step, cold caches", ...
    seconds: float


def startup(spec_path: Path, overrides: tuple[str, ...], reps: int, compiled: bool, progress=None) -> list[StartupRow]:
    import moec

    spec = moec.load_spec(spec_path, overrides=overrides)
    build = []
    for _ in range(reps):
        start = time.perf_counter()
        moec.compile_spec(spec)
        build.append(time.perf_counter() - start)
    rows = [StartupRow("build (spec -> program)", statistics.median(build))]
    with tempfile.TemporaryDirectory(prefix="moec-startup-") as root:
        starts = ("cold caches", "warm caches") if compiled else ("eager",)
        for which in starts:
            if progress:
                progress(f"first step in a new process, {which}")
            rows.append(StartupRow(f"first step, {which}", _first_step(spec_path, overrides, Path(root), compiled)))
    return rows


def _first_step(spec_path: Path, overrides: tuple[str, ...], cache: Path, compiled: bool) -> float:
    env = dict(os.environ, MOEC_CACHE_DIR=str(cache / "moec"), TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"))
    command = [sys.executable, "-m", "moec.bench.startup", str(spec_path), "compiled" if compiled else "eager", *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the start-up child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["first_step_s"]


def _child(spec_file: str, mode: str, overrides: list[str]) -> None:
    import torch

    import moec
    from moec.checkpoint import compile_cache
    from moec.compile import build_model

    spec = moec.load_spec(Path(spec_file), overrides=tuple(overrides))
    program = moec.compile_spec(spec)
    torch.manual_seed(spec.train.seed)
    model = build_model(spec, program=program).train()
    inputs = spec.model.inputs
    shape = (spec.train.batch, spec.train.seq_len)
    x = torch.randint(0, inputs.vocab, shape) if inputs.kind == "tokens" else torch.randn(*shape, inputs.dims)
    step = model
    if mode == "compiled":  # as the trainer compiles on one process
        options = spec.schedule.compile
        compile_cache.load(program.source)
        step = compile_cache.compiled_for_training(model, options, program.source)
    start = time.perf_counter()
    out = step(x)
    (out.output.float().square().mean() + out.aux_loss.float()).backward()
    print(json.dumps({"first_step_s": time.perf_counter() - start}))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3:])
