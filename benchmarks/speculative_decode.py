"""Self-speculative decoding against plain greedy decoding: tokens/s and the acceptance rate of the MTP drafts.

    python benchmarks/speculative_decode.py [--depth 1] [--steps 300] [--files GLOB|repetitive] [--new 64] [--rounds 5] [--threads 1]

deepseek_v3_tiny with ``head.mtp`` of ``--depth`` is trained for ``--steps`` steps (the trainer, eager, on the spec's
byte-level text: the standard library's ``json`` package by default, code with much repeated structure; ``repetitive``:
this docstring repeated, which the MTP module learns to continue), then each round decodes three prompts from the
training text greedily both ways, in turn (interleaved), eager, batch 1, fp32. The table gives the
median over rounds of new tokens / seconds (the prompt's forward included) and the acceptance rate (accepted drafts /
drafted); both ways must give the same tokens. ``--steps 0`` measures the random initial weights.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

import moec
from moec.serve.generate import Generator
from moec.serve.sampling import Sampling
from moec.serve.speculative import SpeculationStats, speculative_stream

FILES = "stdlib:json/*.py"


def spec_text(depth: int, steps: int, files: str) -> str:
    """deepseek_v3_tiny with MTP of ``depth``, trained eagerly on ``files``."""
    data = yaml.safe_load(Path("specs/deepseek_v3_tiny.yaml").read_text(encoding="utf-8"))
    data["model"]["head"]["mtp"] = {"depth": depth, "weight": 0.3}
    data["schedule"] = {"compile": {"enabled": False}}
    data["train"].update(steps=max(steps, 1), batch=8, seq_len=64, lr_schedule={"warmup_steps": min(30, steps)},
                         data={"kind": "text", "files": [files]}, checkpoint={"every": max(steps, 1)},
                         eval={"every": max(steps, 1), "batches": 1})
    return yaml.safe_dump(data)


def trained(depth: int, steps: int, files: str):
    """(model, spec) after ``steps`` training steps (0: the initial weights)."""
    spec = moec.load_spec_text(spec_text(depth, steps, files), file=f"deepseek_v3_tiny_mtp{depth}.yaml")
    if steps == 0:
        return moec.build_model(spec).eval(), spec
    from moec.train.trainer import Trainer

    run_dir = Path(tempfile.mkdtemp(prefix="moec-speculative-bench-")) / "run"
    started = time.perf_counter()
    result = Trainer(spec, run_dir=run_dir).run()
    print(f"trained {steps} steps in {time.perf_counter() - started:.0f} s: train loss {result.final_train_loss:.3f}, "
          f"validation {result.best_val:.3f}")
    return moec.load_trained(run_dir)


def repetitive_files() -> str:
    """Two local files of this module's docstring, 200 times each: the text a draft can guess (a glob of them)."""
    directory = Path(tempfile.mkdtemp(prefix="moec-speculative-text-"))
    for name in ("a.txt", "b.txt"):
        (directory / name).write_text(__doc__ * 200, encoding="utf-8")
    return str(directory / "*.txt")


def prompts(files: str, count: int = 3, length: int = 32) -> list[list[int]]:
    """``count`` prompts of ``length`` bytes from the training text, 1000 bytes apart."""
    from moec.data.datasets import expand_globs

    text = b"".join(path.read_bytes() for path in expand_globs([files]))
    return [list(text[1000 * i:1000 * i + length]) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--files", default=FILES, help="the training text (globs; 'repetitive': this docstring repeated)")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    files = repetitive_files() if args.files == "repetitive" else args.files
    model, spec = trained(args.depth, args.steps, files)
    prompt_ids = prompts(files)
    generator, greedy = Generator(model, spec, compile=False), Sampling(temperature=0)
    stats = SpeculationStats()
    modes = {
        "plain greedy (KV cache)": lambda prompt: list(generator.stream(prompt, args.new, greedy)),
        f"speculative, MTP depth {args.depth}": lambda prompt: list(speculative_stream(generator, prompt, args.new, stats)),
    }
    for prompt in prompt_ids:  # warm-up, and the same tokens both ways
        plain, drafted = (run(prompt) for run in modes.values())
        assert plain == drafted, "speculative decoding changed the greedy tokens"
    stats = SpeculationStats()
    times = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, run in modes.items():
            start = time.perf_counter()
            for prompt in prompt_ids:
                run(prompt)
            times[name].append(time.perf_counter() - start)
    new_tokens = args.new * len(prompt_ids)
    print(f"\n{spec.name} + MTP depth {args.depth}, {args.steps} training steps on {args.files}, {len(prompt_ids)} prompts x {args.new} new "
          f"tokens, batch 1, fp32, eager, {torch.get_num_threads()} threads, median of {args.rounds}")
    print(f"acceptance {stats.acceptance:.3f} ({stats.accepted} of {stats.drafted} drafts), "
          f"{(args.new - 1) * len(prompt_ids) * args.rounds / stats.rounds:.2f} tokens per verifying forward")
    base = new_tokens / statistics.median(times["plain greedy (KV cache)"])
    print(f"{'mode':32s} {'tokens/s':>10s} {'vs plain':>9s}")
    for name, values in times.items():
        rate = new_tokens / statistics.median(values)
        print(f"{name:32s} {rate:10.1f} {rate / base:8.2f}x")


if __name__ == "__main__":
    main()
