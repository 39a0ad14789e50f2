"""MoE layers at the issue's real shapes, bf16, forward + backward, interleaved in one process per shape:
moec's kernels (grouped_mm, Triton, grouped_mm compiled), HF transformers' grouped_mm block, a torchtitan-style
GroupedExperts, the dense equal-FLOP limit, and in fp8 (torchao rowwise) that limit's GEMMs and, on sm90, the
torchtitan-style experts (torchtitan's fp8 MoE recipe; moec's experts stay bf16 under compute: fp8).

    python benchmarks/gpu_layers.py --json OUT.json [--smoke] [--only mixtral-8x7b ...] [--reps 5]

TFLOP/s counts the expert GEMMs' active FLOPs (3 GEMMs x fwd + 2 bwd); ``of_dense`` is time(dense) / time(row),
the fraction of the dense peak measured in the same run. Rows are written after each shape, so a shape cut off by
its ``timeout`` in gpu_check.sh leaves the earlier ones. ``--smoke`` (the CPU, CI): tiny shapes, no torch.compile,
no Triton (Inductor and Triton's interpreter take minutes there), fp8 through torchao's emulation.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch
from real_shapes import REAL, SMOKE, DenseSwiGLU, RealShape, TorchtitanStyle, hf_block

from moec.bench.layers import MoecLayer, layer_spec_text, step_of
from moec.bench.timing import interleaved

DENSE, HF, TITAN = "dense (limit)", "hf grouped_mm", "torchtitan-style"


def fp8_dense(dense: DenseSwiGLU, device: torch.device):
    """The dense limit's three nn.Linear in fp8 (torchao, rowwise: torchtitan's H100 recipe); None without torchao."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        return None
    import dataclasses

    config = dataclasses.replace(Float8LinearConfig.from_recipe_name("rowwise"), emulate=device.type != "cuda")
    return convert_to_float8_training(copy.deepcopy(dense), config=config)


def candidates(real: RealShape, device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    shape, gpu = real.shape, device.type == "cuda"
    dense = DenseSwiGLU(shape, device, dtype)
    modules = {DENSE: dense}
    for kernel in ("grouped_mm", "triton") if gpu else ("grouped_mm",):
        modules[f"moec {kernel}"] = MoecLayer(layer_spec_text(shape, real.layer_yaml(), kernel), device, dtype).train()
    if gpu and not smoke:
        modules["moec grouped_mm compiled"] = torch.compile(modules["moec grouped_mm"], fullgraph=True)
    hf = hf_block(real, device, dtype)
    if hf is not None:
        modules[HF] = hf.train()
    modules[TITAN] = TorchtitanStyle(real, device, dtype)
    fp8 = fp8_dense(dense, device)
    if fp8 is not None:
        modules["dense fp8 (torchao rowwise)"] = fp8
    if gpu and not real.clamped and torch.cuda.get_device_capability(device) >= (9, 0):
        modules[TITAN + " fp8 experts"] = TorchtitanStyle(real, device, dtype, fp8=True)
        modules[TITAN + " fp8 experts"].load_state_dict(modules[TITAN].state_dict())  # the same layer
    return modules


def runnable(modules: dict, x, grad) -> dict:
    """The candidates whose first step runs; one that fails (a kernel this GPU or torchao build lacks) is named and
    left out, so the shape's other rows are still measured."""
    kept = {}
    for name, module in modules.items():
        try:
            step_of(module, x, grad)()
            kept[name] = module
        except Exception as err:  # noqa: BLE001 (reported, not hidden)
            print(f"  {name}: left out, its step failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
    return kept


def measure(real: RealShape, device: torch.device, reps: int, smoke: bool) -> list[dict]:
    shape, dtype = real.shape, torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(1, shape.tokens, shape.width, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, shape.tokens, shape.width, device=device)
    modules = runnable(candidates(real, device, dtype, smoke), x, grad)
    timings = {t.name: t for t in interleaved({name: step_of(m, x, grad) for name, m in modules.items()}, device, reps,
                                              warmup=1 if smoke else 2)}
    dense, hf, titan = timings[DENSE], timings.get(HF), timings[TITAN]
    rows = []
    for name, t in timings.items():
        rows.append({"layer": real.name, "shape": shape.label(), "tokens": shape.tokens, "D": shape.width, "H": shape.hidden,
                     "E": shape.experts, "k": shape.top_k, "name": name, "median_ms": t.median_s * 1e3,
                     "low_ms": t.low_s * 1e3, "high_ms": t.high_s * 1e3, "tflops": shape.active_flops() / t.median_s / 1e12,
                     "of_dense": dense.median_s / t.median_s, "dense_tflops": shape.active_flops() / dense.median_s / 1e12,
                     "vs_hf": t.ratio_to(hf) if hf else None, "vs_torchtitan": t.ratio_to(titan), "peak_bytes": t.peak_bytes})
        print(f"  {name:28s} {t.median_s * 1e3:9.2f} ms  {rows[-1]['tflops']:8.3g} TFLOP/s  of dense {rows[-1]['of_dense']:5.2f}"
              + (f"  {rows[-1]['vs_hf']:5.2f}x HF" if hf else "") + f"  {rows[-1]['vs_torchtitan']:5.2f}x torchtitan-style",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (the CPU smoke test)")
    parser.add_argument("--only", nargs="+", help="layer names to run")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# {where}, torch {torch.__version__}, bf16, fwd+bwd, median of {args.reps} interleaved reps", flush=True)
    result = {"device": where, "dtype": "bfloat16", "torch": torch.__version__, "rows": []}
    for real in SMOKE if args.smoke else REAL:
        if args.only and real.name not in args.only:
            continue
        print(f"\n{real.name}: {real.shape.label()}", flush=True)
        result["rows"] += measure(real, device, args.reps, args.smoke)
        args.json.write_text(json.dumps(result, indent=1))  # after every shape: a timeout keeps what was measured
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
