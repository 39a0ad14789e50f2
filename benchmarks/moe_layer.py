"""One MoE layer, forward + backward: moec (eager, compiled) against dense equal-FLOP GEMMs, HF
transformers' grouped_mm experts and a per-expert loop, interleaved in one process.

    python benchmarks/moe_layer.py [--tokens 4096 64] [--reps 7] [--dtype float32] [--device cpu] [--json OUT]

Shapes: D=512, H=1024, E=8, top-2, SwiGLU (the issue's Mixtral-like layer). Efficiency is
time(dense) / time(layer); "x HF" is time(HF grouped_mm) / time(layer) (> 1: faster than HF).
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from moec.bench.layers import LayerShape, candidates, step_of
from moec.bench.timing import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 64])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernels", nargs="+", default=["auto"])
    parser.add_argument("--shape", type=int, nargs=4, default=[512, 1024, 8, 2], metavar=("D", "H", "E", "K"))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (quick smoke runs)")
    parser.add_argument("--inner", type=int, help="steps per timed sample (default: enough for about 2048 tokens)")
    parser.add_argument("--json")
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.dtype} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, fwd+bwd, "
          f"median of {args.reps} interleaved reps")
    rows = []
    for tokens in args.tokens:
        shape = LayerShape(tokens, *args.shape)
        torch.manual_seed(0)
        x = torch.randn(1, tokens, shape.width, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(1, tokens, shape.width, device=device)
        modules = candidates(shape, device, dtype, kernels=tuple(args.kernels), compiled=not args.no_compile)
        inner = args.inner or (max(1, 2048 // tokens) if device.type == "cpu" else max(1, 8192 // tokens))
        timings = interleaved({name: step_of(m, x, grad) for name, m in modules.items()}, device, args.reps, inner=inner)
        by_name = {t.name: t for t in timings}
        dense, hf = by_name["dense (limit)"], by_name.get("hf grouped_mm")
        print(f"\n{shape.label()}  ({inner} steps per sample)")
        for t in timings:
            vs_hf = f"{t.ratio_to(hf):5.2f}x HF" if hf else ""
            print(f"  {t.name:22s} {t.median_s * 1e3:9.2f} ms  [{t.low_s * 1e3:.2f}-{t.high_s * 1e3:.2f}]  "
                  f"efficiency {dense.median_s / t.median_s:5.2f}  {vs_hf}")
            rows.append({"tokens": tokens, "name": t.name, "median_ms": t.median_s * 1e3, "low_ms": t.low_s * 1e3,
                         "high_ms": t.high_s * 1e3, "efficiency": dense.median_s / t.median_s,
                         "vs_hf": t.ratio_to(hf) if hf else None, "peak_bytes": t.peak_bytes})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
