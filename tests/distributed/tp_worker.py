"""One tensor-parallel forward and backward on the ranks of ``torchrun``, against the one-process model.

Every rank builds the one-process program (no tensor-parallel statements) and the tp program of the
same spec, runs both on the same batch (loss = cross entropy + aux loss) and rank 0 writes the largest
differences of the output, the aux loss, the weights and every gradient (DTensor shards gathered), for
the spec's 2 KV heads (split: one per rank), for 1 KV head (replicated: both ranks read it through
``ReplicatedKvHead``, also compiled with ``fullgraph=True``), with the vocabulary split too
(``embed``, ``head``: the logits stay split, the loss is vocab-parallel), and the vocabulary split with
tied embeddings.
``python -m torch.distributed.run --nproc-per-node 2 -m tests.distributed.tp_worker OUT.json``
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import parallelize_module

import moec
from moec.backends.torch.tp_support import ReplicatedKvHead
from moec.compile import build_model, compile_spec, parallel_module
from moec.train.mtp import mtp_loss, mtp_losses
from moec.train.vocab_loss import cross_entropy, loss_context

SPEC = """version: 1
name: tp_gqa_moe
model:
  d_model: 32
  max_seq_len: 64
  inputs: {{kind: tokens, vocab: 256}}
  blocks:
    - repeat: 2
      layers:
        - kind: attention
          heads: 4
          kv_heads: {kv_heads}
          rope: {{theta: 10000}}
        - kind: moe
          experts: 4
          top_k: 2
          expert: {{hidden: 32, activation: swiglu}}
          aux: {{load_balance: 0.01, z_loss: 0.001, load_balance_batch: global}}
        - kind: mlp
          hidden: 64
          activation: swiglu
  head: {{kind: lm}}
{mesh}schedule:
  compile: {{enabled: false}}
  deterministic: true
train:
  seed: 0
  steps: 5
  batch: 8
  seq_len: 32
  optimizer: {{lr: 3.0e-3}}
  lr_schedule: {{warmup_steps: 2}}
  data: {{kind: text, files: ["stdlib:json/*.py"]}}
  eval: {{every: 3, batches: 2}}
  checkpoint: {{every: 3, keep_last: 2}}
"""
TP2 = "mesh: {world_size: 2, axes: {tp: 2}}\nsharding:\n  tensor: {axis: tp}\n"
VOCAB = "  tensor:\n    axis: tp\n    column: [attention.qkv, experts.up, mlp.up, embed, head]\n"
TP2_VOCAB = TP2.replace("  tensor: {axis: tp}\n", VOCAB)  # Megatron's vocab-parallel embedding and head as well


MOE = """        - kind: moe
          experts: 4
          top_k: 2
          expert: {hidden: 32, activation: swiglu}
          aux: {load_balance: 0.01, z_loss: 0.001, load_balance_batch: global}
"""


def spec_text(mesh: str = "", kv_heads: int = 2) -> str:
    """kv_heads 2: one KV head per rank at tp 2; kv_heads 1: both ranks replicate it."""
    return SPEC.format(mesh=mesh, kv_heads=kv_heads)


def dense_text(mesh: str = "", kv_heads: int = 2) -> str:
    """The spec without its MoE layer: GQA attention and a SwiGLU MLP (what sequence parallelism runs)."""
    text = spec_text(mesh, kv_heads)
    assert MOE in text
    return text.replace(MOE, "")


def tied(text: str) -> str:
    return text.replace("head: {kind: lm}", "head: {kind: lm, tie_embeddings: true}")


def loss_of(model, tokens, vocab_mesh=None, mtp=None):
    """The training loss's backward: the task loss, the aux losses and, with ``mtp`` (head.mtp), its weighted term."""
    out = model(tokens[:, :-1])
    loss = cross_entropy(out.output, tokens[:, 1:], vocab_mesh) + out.aux_loss
    if mtp is not None:
        loss = loss + mtp_loss(mtp_losses(out.mtp_logits, tokens[:, 1:], vocab_mesh), mtp.weight)
    with loss_context(vocab_mesh):
        loss.backward()
    return out


def whole(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def compare(single_text: str, tp_text: str, tokens: torch.Tensor) -> dict:
    spec = moec.load_spec_text(tp_text, file="tp2.yaml")
    mtp = getattr(spec.model.head, "mtp", None)
    single = build_model(moec.load_spec_text(single_text, file="single.yaml")).train()
    expected = loss_of(single, tokens, mtp=mtp)
    program = compile_spec(spec)
    parallel = parallel_module(program)
    mesh = parallel.make_mesh("cpu")
    model = build_model(spec, program=program, mesh=mesh).train()  # parallel.py's tensor_parallel splits it
    got = loss_of(model, tokens, mesh["tp"] if hasattr(parallel, "VOCAB_PARALLEL") else None, mtp)
    reference = dict(single.named_parameters())
    split = sorted(name for name, p in model.named_parameters() if hasattr(p, "to_local"))

    def columns(logits):  # logits split along the vocabulary: this rank's columns
        return logits.chunk(dist.get_world_size(), -1)[dist.get_rank()] if hasattr(parallel, "VOCAB_PARALLEL") else logits

    return {
        "output": (got.output - columns(expected.output)).abs().max().item(),
        "mtp_logits": [(a - columns(b)).abs().max().item() for a, b in zip(got.mtp_logits, expected.mtp_logits, strict=True)],
        "aux_loss": abs(got.aux_loss.item() - expected.aux_loss.item()),
        "weights": max((whole(p.detach()) - reference[name]).abs().max().item() for name, p in model.named_parameters()),
        "grads": {name: ((whole(p.grad) - reference[name].grad).abs().max() / reference[name].grad.abs().max()).item()
                  for name, p in model.named_parameters()},
        "split": split,
        "local_shapes": {name: list(dict(model.named_parameters())[name].to_local().shape) for name in split},
    }


def compiled_kv_head() -> float:
    """ReplicatedKvHead (a whole k projection, each rank keeping its KV head) traced with fullgraph=True against
    eager: the largest relative difference of the loss and the gradients (2 KV heads of 4 rows)."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 32, generator=generator, requires_grad=True)
    linear = torch.nn.Linear(32, 8, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(8, 32, generator=generator))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    parallelize_module(linear, mesh, ReplicatedKvHead(2))

    def loss(x):
        return linear(x).square().sum()

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        value = fn(x)
        results.append((value.detach(), *torch.autograd.grad(value, (x, linear.weight))))
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*results))  # relative to each one's largest entry


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    diffs = {"kv_heads_2": compare(spec_text(), spec_text(TP2), tokens),
             "kv_heads_1": compare(spec_text(kv_heads=1), spec_text(TP2, 1), tokens),
             "vocab": compare(spec_text(), spec_text(TP2_VOCAB), tokens),
             "tied": compare(tied(spec_text()), tied(spec_text(TP2_VOCAB)), tokens),
             "compiled_kv_head": compiled_kv_head()}
    write_and_exit(out_path, diffs)


def write_and_exit(out_path: str, diffs: dict) -> None:
    """Rank 0 writes ``diffs``; every rank leaves the group, then exits without the interpreter's teardown: once (of
    many runs, under a loaded 2-core CI) a rank aborted there ("terminate called without an active exception", after
    its work was done), failing the job."""
    if dist.get_rank() == 0:
        with open(out_path, "w") as file:
            json.dump(diffs, file)
    dist.barrier()  # both ranks are done with every collective before either tears down
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
