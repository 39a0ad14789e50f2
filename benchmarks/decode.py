"""Decode tokens/s at a 512-token context: moec's KV cache (compiled and eager) against recomputing
the window per token, and against Hugging Face transformers' ``generate`` on the same weights
(the spec exported with ``moec export hf``'s code: Mixtral for token_routed_tiny).

    python benchmarks/decode.py [--spec specs/token_routed_tiny.yaml] [--context 512] [--new 32] [--rounds 3] [--threads 1] [KEY=VALUE...]

Greedy, batch 1, fp32, ``--threads`` CPU threads (default: as torch sets them). Each round times every mode once, in
turn (interleaved); the table shows the median over rounds of new tokens / seconds (prefill
included: each mode starts from the 512-token prompt). The greedy tokens of every mode are
checked against the recomputation.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import moec
from moec.serve.generate import Generator
from moec.serve.sampling import Sampling


def recompute(model, prompt: list[int], new: int) -> list[int]:
    tokens = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(new):
            token = model(tokens).output[:, -1].argmax(-1)
            tokens = torch.cat([tokens, token[:, None]], 1)
            out.append(int(token))
    return out


def hf_model(spec, model):
    from transformers import AutoModelForCausalLM

    from moec.interop.hf_export import export_hf

    directory = Path(tempfile.mkdtemp(prefix="moec-decode-bench-"))
    export_hf(spec, model.state_dict(), directory)
    return AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()


def hf_generate(hf, prompt: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", default="specs/token_routed_tiny.yaml")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default). On a shared, "
                        "loaded machine 1 avoids OpenMP threads waiting on each other at every small op.")
    parser.add_argument("overrides", nargs="*", default=["model.blocks[0].layers[1].aux.load_balance_scope=model"],
                        help="KEY=VALUE spec overrides (default: the HF-exportable balance-loss scope)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # aux.load_balance_scope=model: how HF pools the balance loss (training only; the export refuses the per-layer one)
    spec = moec.load_spec(args.spec, (f"model.max_seq_len={max(1024, 2 * args.context)}", *args.overrides))
    model = moec.build_model(spec).eval()
    prompt = torch.randint(0, spec.model.inputs.vocab, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy = Sampling(temperature=0)
    compiled, eager = Generator(model, spec), Generator(moec.build_model(spec).eval(), spec, compile=False)
    modes = {
        "moec KV cache, compiled": lambda: list(compiled.stream(prompt, args.new, greedy)),
        "moec KV cache, eager": lambda: list(eager.stream(prompt, args.new, greedy)),
        "moec recompute (eager forward)": lambda: recompute(model, prompt, args.new),
    }
    try:
        hf = hf_model(spec, model)
        modes["HF transformers generate (KV cache)"] = lambda: hf_generate(hf, prompt, args.new)
    except Exception as err:  # transformers missing, or a spec no HF family holds
        print(f"(no HF comparison: {type(err).__name__}: {err})")
    reference = recompute(model, prompt, args.new)
    for name, run in modes.items():  # warm-up (compiles), and the same greedy tokens everywhere
        print(f"{name}: greedy tokens {'match' if run() == reference else 'DIFFER from'} the recomputation")
    times = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, run in modes.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    base = args.new / statistics.median(times["moec recompute (eager forward)"])
    print(f"\n{spec.name}, context {args.context}, {args.new} new tokens, batch 1, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.rounds}")
    print(f"{'mode':40s} {'tokens/s':>10s} {'vs recompute':>13s}")
    for name, values in times.items():
        rate = args.new / statistics.median(values)
        print(f"{name:40s} {rate:10.1f} {rate / base:12.2f}x")


if __name__ == "__main__":
    main()
