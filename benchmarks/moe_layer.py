"""One MoE layer, forward + backward: moec (each kernel, and auto's measured choice; eager and
compiled) against dense equal-FLOP GEMMs (the limit), HF transformers' grouped_mm experts and a
per-expert loop, interleaved in one process, medians.

    python benchmarks/moe_layer.py [--tokens 4096 64] [--reps 7] [--dtype float32] [--device cpu]
                                   [--kernels grouped_mm eager auto] [--json OUT]

Shapes: D=512, H=1024, E=8, top-2, SwiGLU (the issue's Mixtral-like layer). Efficiency is
time(dense) / time(layer); "x HF" is time(HF grouped_mm) / time(layer) (> 1: faster than HF).
``auto`` is kernels.moe auto as a build would resolve it at these tokens (moec.bench.kernel_choice:
timed once, or read from $MOEC_CACHE_DIR/kernel-choice.json); its row is labelled with the kernel
it chose, and the choice line is printed.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

import moec
from moec.bench.kernel_choice import choose_moe_kernels
from moec.bench.layers import LayerShape, MoecLayer, candidates, layer_spec_text, step_of
from moec.bench.timing import interleaved

SPEC_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def measured_auto(shape: LayerShape, device: torch.device, dtype_name: str, compiled: bool) -> dict[str, torch.nn.Module]:
    """kernels.moe auto's choice for this layer at these tokens, as the module a build of it would run."""
    text = layer_spec_text(shape)
    spec = moec.load_spec_text(text, "<moe_layer auto>", overrides=(f"schedule.precision.params={SPEC_DTYPES[dtype_name]}",))
    choice = choose_moe_kernels(spec, device.type, log=print)
    print(f"# {shape.label()}: {choice.line()}")
    kernel = choice.layers[0].kernel if choice.layers else "fixed rule"
    layer = MoecLayer(text, device, getattr(torch, dtype_name), kernel_choice=choice).train()
    modules = {f"moec auto ({kernel}) eager": layer}
    if compiled:
        modules[f"moec auto ({kernel}) compiled"] = torch.compile(layer, fullgraph=True)
    return modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 64])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernels", nargs="+", default=["grouped_mm", "eager", "auto"],
                        help="moec kernels to time; auto: kernels.moe auto's measured choice")
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
        forced = tuple(kernel for kernel in args.kernels if kernel != "auto")
        modules = candidates(shape, device, dtype, kernels=forced, compiled=not args.no_compile, compiled_kernels=forced)
        if "auto" in args.kernels:
            modules |= measured_auto(shape, device, args.dtype, compiled=not args.no_compile)
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
