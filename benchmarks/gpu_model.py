"""A whole training step of a 1.9B-parameter MoE (benchmarks/olmoe_shape.yaml): moec compiled against HF
transformers' MixtralForCausalLM on the same weights, both bf16, then the same moec module with ``compute: fp8`` (its projections
through torchao's rowwise float8 training; the experts stay bf16); tokens/s, MFU and peak memory.

    python benchmarks/gpu_model.py --json OUT.json [--smoke] [--steps 10]

One step: zero the gradients, forward on batch x seq_len random token ids, next-token cross-entropy + the
load-balance loss (HF's: labels = inputs, ``output_router_logits``), backward, AdamW. The steps run one after
another (each with its own AdamW state; HF's model is freed before fp8), each compiled, warmed up, then timed over
``--steps`` steps between CUDA synchronizations; peak memory is ``torch.cuda.max_memory_allocated`` over the timed
steps. MFU: the manifest's training FLOPs per token (the same model for all three) x tokens/s over the device's
dense bf16 peak (``moec.observe.mfu``; fp8 too, as torchtitan reports it). Rows are written after every model.
``--smoke`` (the CPU, CI): the spec shrunk by overrides, no torch.compile, fp8 emulated.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from model_step import hf_step, lm_loss, moec_step

import moec
from moec.compile import build_model, compile_spec, parallel_module
from moec.interop.hf_export import export_hf
from moec.observe.mfu import device_peak

SPEC = Path(__file__).with_name("olmoe_shape.yaml")
SMOKE = ["model.d_model=64", "model.inputs.vocab=256", "model.blocks[0].repeat=2", "model.blocks[0].layers[0].heads=4",
         "model.blocks[0].layers[0].kv_heads=4", "model.blocks[0].layers[1].experts=8", "model.blocks[0].layers[1].top_k=2",
         "model.blocks[0].layers[1].expert.hidden=32", "model.max_seq_len=64", "train.batch=2", "train.seq_len=32"]


def hf_twin(spec, model, device):
    """HF's MixtralForCausalLM with ``model``'s weights: moec's export read back by ``from_pretrained`` (HF converts
    the checkpoint layout itself), its experts on grouped_mm, bf16."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as directory:
        export_hf(spec, {k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(directory))
        hf = AutoModelForCausalLM.from_pretrained(directory, output_router_logits=True, dtype=torch.bfloat16,
                                                  experts_implementation="grouped_mm")
    return hf.to(device).train()


def timed(step, device: torch.device, warmup: int, steps: int) -> tuple[float, int | None]:
    """Seconds per step (median-free: total over ``steps`` between synchronizations) and peak bytes."""
    for _ in range(warmup):  # the first one compiles
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return seconds, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def row(name, spec, seconds, peak, flops_per_token, device_name) -> dict:
    tokens = spec.train.batch * spec.train.seq_len
    peak_flops = device_peak(device_name, "bf16")
    mfu = tokens / seconds * flops_per_token / peak_flops[1] if peak_flops else None
    print(f"  {name:12s} {seconds * 1e3:9.1f} ms/step  {tokens / seconds:10.0f} tokens/s  "
          + (f"MFU {mfu:.1%}  " if mfu is not None else "") + (f"peak {peak / 2**30:.1f} GiB" if peak else ""), flush=True)
    return {"name": name, "ms_per_step": seconds * 1e3, "tokens_per_s": tokens / seconds, "mfu": mfu, "peak_bytes": peak,
            "tokens_per_step": tokens, "flops_per_token": flops_per_token}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    overrides = SMOKE + (["schedule.compile.enabled=false"] if args.smoke else [])
    spec = moec.load_spec(SPEC, overrides=overrides if args.smoke else [])
    fp8_spec = moec.load_spec(SPEC, overrides=(overrides if args.smoke else []) + ["schedule.precision.compute=fp8"])
    compiled = spec.schedule.compile.enabled
    tokens = torch.randint(0, spec.model.inputs.vocab, (spec.train.batch, spec.train.seq_len), device=device)
    result = {"device": name, "spec": str(SPEC.name), "overrides": overrides if args.smoke else [], "torch": torch.__version__,
              "compiled": compiled, "rows": []}
    print(f"# {name}, torch {torch.__version__}, {SPEC.name}, batch {spec.train.batch} x {spec.train.seq_len}", flush=True)
    program = compile_spec(spec)
    model = build_model(spec, device=device, program=program).train()  # the spec's seed: HF gets these weights
    flops = program.manifest["flops_per_token"]["training"]
    hf = hf_twin(spec, model, device)
    with torch.no_grad():  # the same weights: the same first loss (CE + load balance), bf16 rounding apart
        first = {"moec": lm_loss(model(tokens), tokens).item(), "hf mixtral": hf(input_ids=tokens, labels=tokens).loss.item()}
    float8_training = parallel_module(compile_spec(fp8_spec)).float8_training
    for label in ("moec", "hf mixtral", "moec fp8"):
        if label == "moec fp8":  # the same module (its weights a few AdamW steps on), projections converted
            model = float8_training(model, emulate=device.type != "cuda")
        runs = hf if label == "hf mixtral" else model
        params = sum(p.numel() for p in runs.parameters())
        if compiled:
            runs = torch.compile(runs, fullgraph=label != "hf mixtral")
        step = hf_step(runs, tokens) if label == "hf mixtral" else moec_step(spec, runs, tokens)
        seconds, peak = timed(step, device, 3 if compiled else 1, args.steps)
        result["rows"].append(row(label, spec, seconds, peak, flops, name) | {"parameters": params, "first_loss": first.get(label)})
        args.json.write_text(json.dumps(result, indent=1))
        del runs, step
        if label == "hf mixtral":
            del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
