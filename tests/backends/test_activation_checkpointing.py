"""schedule.activation_checkpointing: the generated plan, identical numbers, less peak memory."""

import pytest
import torch

import moec
from moec.compile import build_model, parallel_module
from moec.observe.cpu_memory import peak_allocated_bytes
from moec.train.trainer import Trainer
from tests.runtime.helpers import quick_text

MODEL = """version: 1
name: ac
model:
  d_model: 64
  max_seq_len: 128
  inputs: {kind: tokens, vocab: 256}
  blocks:
    - repeat: 4
      norm: {kind: rmsnorm}
      layers:
        - kind: attention
          heads: 4
          kv_heads: 2
          rope: {theta: 10000}
        - kind: moe
          experts: 4
          top_k: 2
          expert: {hidden: 128, activation: swiglu}
          aux: {load_balance: 0.01}
  head: {kind: lm}
schedule:
  compile: {enabled: false}
  activation_checkpointing: AC
train:
  seed: 0
  steps: 1
  batch: 8
  seq_len: 128
  optimizer: {lr: 1.0e-3}
  data: {kind: text}
"""
MODES = {"none": "{mode: none}", "full": "{mode: full}", "selective": "{mode: selective}", "full_every_2": "{mode: full, every: 2}"}


def spec_for(mode: str):
    return moec.load_spec_text(MODEL.replace("AC", MODES[mode]), file="ac.yaml")


@pytest.fixture(scope="module")
def runs():
    """Per mode: the loss, every gradient, and the peak bytes one forward + backward allocated."""
    tokens = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode in MODES:
        spec = spec_for(mode)
        program = moec.compile_spec(spec)
        model = build_model(spec, program=program).train()
        parallel_module(program).checkpoint_activations(model)
        loss = {}

        def step(model=model, loss=loss):
            out = model(tokens)
            logits = out.output[:, :-1].reshape(-1, 256)
            loss["value"] = torch.nn.functional.cross_entropy(logits, tokens[:, 1:].reshape(-1)) + out.aux_loss
            loss["value"].backward()

        peak = peak_allocated_bytes(step)
        results[mode] = (loss["value"].detach(), {name: p.grad for name, p in model.named_parameters()}, peak)
    return results


def test_generated_plan_names_the_checkpointed_blocks():
    source = moec.compile_spec(spec_for("full_every_2")).parallel_source
    assert "from torch.utils.checkpoint import checkpoint\n" in source
    assert ("    for index in (1, 3):  # every 2nd block  # ac.yaml:23 schedule.activation_checkpointing\n"
            "        block = model.blocks[index]\n"
            "        block.forward = partial(checkpoint, block.forward, use_reentrant=False)\n") in source
    selective = moec.compile_spec(spec_for("selective")).parallel_source
    assert "def save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:" in selective
    assert ("    for index in range(0, 4):  # every block  # ac.yaml:23 schedule.activation_checkpointing\n" in selective)
    assert "context_fn=partial(create_selective_checkpoint_contexts, save_matmuls))" in selective
    off = moec.compile_spec(spec_for("none")).parallel_source
    assert "torch.utils.checkpoint" not in off and '"""Nothing to do: activation checkpointing is off."""' in off


def test_selective_policy_saves_matmuls_and_attention():
    module = parallel_module(moec.compile_spec(spec_for("selective")))
    aten = torch.ops.aten
    assert {aten.mm.default, aten.addmm.default, aten.bmm.default} <= module.SAVED_OPS
    assert aten._scaled_dot_product_flash_attention_for_cpu.default in module.SAVED_OPS
    assert aten.silu.default not in module.SAVED_OPS


@pytest.mark.parametrize("mode", ["full", "selective", "full_every_2"])
def test_same_loss_and_gradients(runs, mode):
    loss, grads, _ = runs["none"]
    other_loss, other_grads, _ = runs[mode]
    assert torch.equal(loss, other_loss)  # the recomputed forward is the same arithmetic, in the same order
    assert grads.keys() == other_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, other_grads[name]), name


def test_checkpointing_lowers_peak_memory(runs):
    peak = {mode: result[2] for mode, result in runs.items()}
    print({mode: f"{bytes_ / 2**20:.1f} MiB" for mode, bytes_ in peak.items()})
    assert peak["full"] < peak["full_every_2"] < peak["none"]
    assert peak["full"] <= peak["selective"] < peak["none"]


def test_training_with_compile_matches(tmp_path):
    """Under torch.compile (the default) the checkpointed blocks trace and train to the same losses."""
    def loss(schedule: str) -> float:
        text = quick_text(steps=2, every=10).replace("compile: {enabled: false}", schedule)
        return Trainer(moec.load_spec_text(text, file="q.yaml"), run_dir=tmp_path / str(len(schedule))).run().final_train_loss

    compiled = loss("compile: {backend: aot_eager}\n  activation_checkpointing: {mode: selective}")
    assert compiled == pytest.approx(loss("compile: {enabled: false}"), abs=1e-5)
