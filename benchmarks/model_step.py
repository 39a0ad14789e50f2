"""A whole training step of token_routed_tiny against HF transformers' MixtralForCausalLM of the
same shape and weights, both under torch.compile, interleaved in one process.

    python benchmarks/model_step.py [--reps 7] [--inner 5] [--no-compile] [--baseline OLD/model.py]

One step: zero the gradients, forward on the spec's batch (batch x seq_len random token ids),
next-token cross-entropy (HF's: labels = inputs, shifted) + aux loss, backward, AdamW step. The HF model comes from moec's own export
(``export_hf``, loaded by ``from_pretrained``: the same parameters, 254,784 of them), with the load-balance loss
pooled over the model as HF computes it (``aux.load_balance_scope=model``) and HF's
``output_router_logits`` on, so both add the same auxiliary loss. "x HF" > 1: moec is faster.

``--baseline``: a ``model.py`` written by another moec (``moec build`` of the same spec and overrides
at another commit), loaded with the same weights and timed in the same interleaved rounds: the
program before and after a change of the emitter, side by side.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import moec
from moec.bench.timing import interleaved
from moec.interop.hf_export import export_hf

OVERRIDES = ["model.blocks[0].layers[1].aux.load_balance_scope=model"]


def lm_loss(out, tokens):
    """Next-token cross-entropy on positions 0 .. S-2 (as HF computes it from labels = inputs) + aux loss."""
    return F.cross_entropy(out.output[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()) + out.aux_loss


def moec_step(spec, model, tokens):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(tokens)
        loss = lm_loss(out, tokens)
        loss.backward()
        optimizer.step()
    return step


def hf_model(spec, state):
    """HF's model loaded from moec's export of ``state`` (HF converts the checkpoint layout itself)."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as directory:
        export_hf(spec, state, Path(directory))
        model = AutoModelForCausalLM.from_pretrained(directory, output_router_logits=True)
    return model.train()


def hf_step(model, tokens):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=tokens, labels=tokens)  # HF shifts the labels itself
        out.loss.backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/token_routed_tiny.yaml")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--baseline", type=Path, help="a model.py built by another moec from the same spec and overrides")
    args = parser.parse_args()
    spec = moec.load_spec(args.spec, overrides=OVERRIDES)
    torch.manual_seed(0)
    model = moec.build_model(spec).train()
    hf = hf_model(spec, {k: v.detach().clone() for k, v in model.state_dict().items()})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"moec {count(model):,} parameters, HF {count(hf):,}; batch {spec.train.batch} x {spec.train.seq_len} tokens; "
          f"median of {args.reps} interleaved reps of {args.inner} steps")
    tokens = torch.randint(0, spec.model.inputs.vocab, (spec.train.batch, spec.train.seq_len))
    with torch.no_grad():  # the same model: the same first loss
        out = model(tokens)
        ours = lm_loss(out, tokens)
        theirs = hf(input_ids=tokens, labels=tokens).loss
    print(f"  first loss: moec {ours.item():.6f}, HF {theirs.item():.6f}")
    baseline = _baseline(args.baseline, model, tokens) if args.baseline else None
    if not args.no_compile:
        model, hf = torch.compile(model, fullgraph=True), torch.compile(hf)
        baseline = baseline and torch.compile(baseline, fullgraph=True)
    steps = {"moec": moec_step(spec, model, tokens), "hf mixtral": hf_step(hf, tokens)}
    if baseline is not None:
        steps["baseline"] = moec_step(spec, baseline, tokens)
    timings = {t.name: t for t in interleaved(steps, torch.device("cpu"), args.reps, inner=args.inner, warmup=3)}
    for name, t in timings.items():
        print(f"  {name:12s} {t.median_s * 1e3:8.2f} ms/step  [{t.low_s * 1e3:.2f}-{t.high_s * 1e3:.2f}]")
    print(f"  moec is {timings['moec'].ratio_to(timings['hf mixtral']):.2f}x HF")
    if baseline is not None:
        print(f"  moec is {timings['moec'].ratio_to(timings['baseline']):.2f}x the baseline program")


def _baseline(path: Path, model, tokens):
    """The other program's model (with the ``model_support.py`` beside it, when there is one) with this model's
    weights; names from before the nn.Linear projections (``attention.wq`` for ``attention.wq.weight``) are mapped.
    Its first loss must agree."""
    from moec.backends.torch.loader import load_program

    support = path.with_name("model_support.py")
    old = load_program(path.read_text(), Path(tempfile.mkdtemp()) / "baseline_model.py",
                       support=support.read_text() if support.exists() else None).Model().train()
    names = set(old.state_dict())
    old.load_state_dict({name if name in names else name.removesuffix(".weight"): value for name, value in model.state_dict().items()})
    with torch.no_grad():
        a, b = lm_loss(model(tokens), tokens), lm_loss(old(tokens), tokens)
    print(f"  first loss: baseline program {b.item():.6f} (this one {a.item():.6f})")
    return old


if __name__ == "__main__":
    main()
