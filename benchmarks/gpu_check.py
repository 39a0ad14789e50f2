"""The CUDA checks of the MoE kernels, then the GPU benchmark rows (run by gpu_check.sh).

Checks (each prints PASS/FAIL and its error): under bf16 autocast the expert GEMMs run on the
native bf16 grouped_mm and agree with fp32 on the CPU; fp32 on CUDA runs moec's Triton GEMM
and agrees; ``kernels.moe: triton`` (dropless and capacity, fp32 and bf16 autocast) agrees and
two identical steps give bitwise equal outputs and gradients (its router, permutation and
combine use no atomics);
no host sync in a training step (torch.cuda.set_sync_debug_mode("error")), eager and
compiled; a CUDA graph of the inference forward replays to the same output.

    python benchmarks/gpu_check.py OUT_DIR [--device cuda] [--small]
"""

from __future__ import annotations

import json
import sys
import traceback

import torch
import torch.nn.functional as F

from moec.bench.layers import LayerShape, MoecLayer, layer_spec_text

RESULTS: list[dict] = []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name: str):
    def wrap(fn):
        def run(*args):
            try:
                detail = fn(*args)
                RESULTS.append({"check": name, "ok": True, "detail": detail})
                print(f"PASS {name}: {detail}", flush=True)
            except Exception as err:  # a failed check is reported, the others still run
                RESULTS.append({"check": name, "ok": False, "detail": f"{type(err).__name__}: {err}"})
                print(f"FAIL {name}: {type(err).__name__}: {err}", flush=True)
                traceback.print_exc()
        return run
    return wrap


def pair(spec_text: str, device):
    """The same layer on the CPU in fp32 (the reference) and on ``device`` in fp32 (same weights)."""
    cpu = MoecLayer(spec_text, "cpu", torch.float32).train()
    with torch.no_grad():  # router logits = x[:, :E] (see separated_routes)
        weight = cpu.moe.router.weight
        weight.zero_()
        weight[:, : weight.shape[0]] = torch.eye(weight.shape[0])
    dev = MoecLayer(spec_text, device, torch.float32).train()
    dev.load_state_dict(cpu.state_dict())
    return cpu, dev


def separated_routes(x: torch.Tensor, experts: int) -> torch.Tensor:
    """x with x[..., :E] a permutation of 0..E-1 per token times a per-token scale in [1, 2): router
    logits (the identity router of ``pair``: exact in any dtype) at least 1 apart, so rounding
    never changes which experts a token picks, and tokens' scores differ (no capacity ties). The
    checks then see the expert GEMMs' precision, not a few tokens routed elsewhere (~10% moves)."""
    x = x.clone()
    ranks = torch.argsort(torch.rand(*x.shape[:-1], experts, device=x.device), -1).to(x.dtype)
    x[..., :experts] = ranks * (1 + torch.rand(*x.shape[:-1], 1, device=x.device))
    return x.bfloat16().float()  # exact in bf16: autocast's cast of x changes no logit, so capacity ranks alike


def step(layer, x, grad, autocast: bool):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out, aux = layer(x)
    ((out.float() * grad).sum() + aux.float()).backward()
    return [out.detach(), x.grad] + [p.grad for p in layer.parameters()]


def compare(layer_ref, layer, x, grad, autocast: bool, tol: float) -> str:
    """Against the CPU layer in fp32 (inputs from separated_routes: tokens route alike in any precision)."""
    want = step(layer_ref, x.cpu(), grad.cpu(), False)
    got = step(layer, x, grad, autocast)
    errors = [rel(g, w) for g, w in zip(got, want)]
    assert max(errors) < tol, f"relative errors {errors} over {tol}"
    return f"max rel err {max(errors):.2e} over output, input grad and {len(errors) - 2} weight grads"


def count_grouped_mm(fn):
    """Run fn with F.grouped_mm wrapped: the dtypes it was called with."""
    seen, original = [], F.grouped_mm

    def wrapped(a, b, *args, **kwargs):
        seen.append(str(a.dtype))
        return original(a, b, *args, **kwargs)
    F.grouped_mm = wrapped
    try:
        fn()
    finally:
        F.grouped_mm = original
    return seen


def deterministic(layer, x, grad) -> str:
    first, second = step(layer, x, grad, True), step(layer, x, grad, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "outputs or gradients differ between two identical steps"
    return f"{len(first)} tensors bitwise equal"


def no_sync(fn) -> None:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main() -> None:
    out_dir = sys.argv[1]
    device = torch.device("cuda")
    small = "--small" in sys.argv
    shape = LayerShape(48 if small else 512, 32 if small else 256, 32 if small else 512, 4 if small else 8, 2)
    torch.manual_seed(0)
    x = separated_routes(torch.randn(1, shape.tokens, shape.width, device=device), shape.experts)
    grad = torch.randn(1, shape.tokens, shape.width, device=device)
    dropless = layer_spec_text(shape)
    capacity_layer = (f"{{kind: moe, experts: {shape.experts}, top_k: 2, capacity: {{mode: capacity, factor: 0.5}}, "
                      f"expert: {{hidden: {shape.hidden}, activation: swiglu}}}}")

    ref, layer = pair(dropless, device)

    @check("runtime.grouped_linear under bf16 autocast (an empty expert) vs fp32 on the GPU")
    def op_level():
        from moec.backends.torch import runtime

        counts = torch.tensor([shape.tokens // 2, 0] + [shape.tokens // 2] + [0] * (shape.experts - 3), device=device)
        offsets = counts.cumsum(0).to(torch.int32)
        rows = torch.randn(shape.tokens, shape.width, device=device)
        w = torch.randn(shape.experts, shape.hidden, shape.width, device=device)
        want = torch.cat([rows[: shape.tokens // 2] @ w[0].T, rows[shape.tokens // 2 :] @ w[2].T])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = runtime.grouped_linear(rows, w, offsets)
        assert got.dtype == torch.bfloat16, got.dtype
        err = rel(got, want)
        assert err < 1e-2, err
        return f"bf16 output, rel err {err:.1e} vs fp32"
    op_level()

    @check("bf16 autocast: expert GEMMs on native bf16 grouped_mm, agree with fp32 CPU")
    def autocast_native():
        dtypes = count_grouped_mm(lambda: step(layer, x, grad, True))
        assert dtypes and set(dtypes) == {"torch.bfloat16"}, f"grouped_mm calls: {dtypes}"
        return f"{len(dtypes)} grouped_mm calls, all bf16; " + compare(ref, layer, x, grad, True, 3e-2)
    autocast_native()

    @check("fp32 on CUDA: moec Triton grouped GEMM, agrees with fp32 CPU")
    def fp32_triton():
        dtypes = count_grouped_mm(lambda: step(layer, x, grad, False))
        assert not dtypes, f"native grouped_mm ran in {dtypes} (its fp32 CUDA fallback syncs)"
        return compare(ref, layer, x, grad, False, 1e-4)
    fp32_triton()

    for label, spec in (("dropless", layer_spec_text(shape, kernel="triton")),
                        ("capacity 0.5", layer_spec_text(shape, capacity_layer, kernel="triton"))):
        ref_t, layer_t = pair(spec, device)
        ref_g = MoecLayer(layer_spec_text(shape, capacity_layer if "capacity" in label else None), "cpu", torch.float32).train()
        ref_g.load_state_dict(ref_t.state_dict())
        check(f"kernels.moe triton {label}, fp32: agrees with the CPU grouped path")(lambda: compare(ref_g, layer_t, x, grad, False, 1e-4))()
        check(f"kernels.moe triton {label}, bf16 autocast: agrees")(lambda: compare(ref_g, layer_t, x, grad, True, 3e-2))()
        check(f"kernels.moe triton {label}: no host sync in a training step")(lambda: no_sync(lambda: step(layer_t, x, grad, True)) or "ok")()
        check(f"kernels.moe triton {label}: bitwise deterministic")(lambda: deterministic(layer_t, x, grad))()

    check("grouped_mm bf16 autocast eager: no host sync in a training step")(lambda: no_sync(lambda: step(layer, x, grad, True)) or "ok")()
    check("fp32 eager (Triton GEMM): no host sync in a training step")(lambda: no_sync(lambda: step(layer, x, grad, False)) or "ok")()

    compiled = torch.compile(layer, fullgraph=True)

    @check("compiled (fullgraph) under bf16 autocast: agrees, no host sync")
    def compiled_ok():
        detail = compare(ref, compiled, x, grad, True, 3e-2)
        no_sync(lambda: step(compiled, x, grad, True))
        return detail
    compiled_ok()

    @check("CUDA graph of the inference forward (bf16 autocast) replays to the same output")
    def cuda_graph():
        layer.eval()
        static_x = x.clone()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    layer(static_x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out, _ = layer(static_x)
            fresh = torch.randn_like(x)
            static_x.copy_(fresh)
            graph.replay()
            eager_out, _ = layer(fresh)
        layer.train()
        err = rel(static_out, eager_out)
        assert err < 1e-6, f"replay differs from eager by {err}"
        return f"replay on new inputs matches eager (rel {err:.1e})"
    cuda_graph()

    with open(f"{out_dir}/checks.json", "w") as f:
        json.dump(RESULTS, f, indent=1)
    failed = [r["check"] for r in RESULTS if not r["ok"]]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed" + (f"; FAILED: {failed}" if failed else ""), flush=True)


if __name__ == "__main__":
    main()
