"""Multi-token prediction (``head.mtp``, DeepSeek-V3): the program against the reference interpreter (outputs, MTP
losses, every gradient), the MTP loss against a straightforward implementation over the program's own modules,
parameter and FLOPs counts, evaluation without MTP, and a short training run that logs each depth's loss."""

import json

import pytest
import torch
import torch.nn.functional as F

import moec
from moec.backends.init import init_parameter
from moec.compile import build_model, compile_spec
from moec.passes.flops import block_flops, flops_per_token
from moec.schema.checks import estimate_params
from moec.train.mtp import mtp_loss, mtp_losses
from tests.backends.test_torch_differential import rel_error

D, V, WEIGHT = 16, 256, 0.3
DENSE = "        - kind: mlp\n          hidden: 32\n"
MOE = "        - kind: moe\n          experts: 4\n          top_k: 2\n          expert: {hidden: 8}\n"


def mtp_text(depth: int | None, last: str = MOE, tied: bool = False, steps: int = 2) -> str:
    mtp = "" if depth is None else f", mtp: {{depth: {depth}, weight: {WEIGHT}}}"
    return f"""version: 1
name: mtp_{depth}
model:
  d_model: {D}
  max_seq_len: 32
  inputs: {{kind: tokens, vocab: {V}}}
  blocks:
    - layers:
        - kind: attention
          heads: 2
{DENSE}    - layers:
        - kind: attention
          heads: 2
{last}  head: {{kind: lm, tie_embeddings: {str(tied).lower()}{mtp}}}
mesh:
  world_size: 1
  axes: {{dp: 1}}
schedule:
  compile: {{enabled: false}}
train:
  seed: 0
  steps: {steps}
  batch: 4
  seq_len: 16
  eval: {{every: {steps}, batches: 1}}
  optimizer: {{lr: 1.0e-3}}
  data: {{kind: text}}
"""


def mtp_spec(depth: int | None, **kwargs):
    return moec.load_spec_text(mtp_text(depth, **kwargs), file=f"mtp_{depth}.yaml")


# HF's DeepSeek-V3 import (deepseek_v3_671b.yaml): no balance loss, so its 'model' scope pools nothing the MTP block adds to
HF_MOE = MOE + "          aux: {load_balance: 0.0, load_balance_scope: model, z_loss: 0.0}\n"
CASES = {"depth1_dense_tied": (1, DENSE, True), "depth2_moe": (2, MOE, False), "depth1_moe_no_balance_loss": (1, HF_MOE, False)}


def _tokens(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_program_agrees_with_the_reference(case):
    """Outputs, aux loss, each depth's logits and loss, and every gradient of the training loss to 1e-5 relative."""
    depth, last, tied = CASES[case]
    spec = mtp_spec(depth, last=last, tied=tied)
    program = compile_spec(spec)
    model, ref = build_model(spec, program=program).train(), moec.reference_model(spec).train()
    for seed in (0, 1):
        with torch.no_grad():
            state = {node.attr["name"]: init_parameter(node, seed) for node in program.graph.params()}
            model.load_state_dict(state), ref.load_state_dict(state)
        sequence = _tokens(seed=seed)
        inputs, targets = sequence[:, :-1], sequence[:, 1:]
        a, b = model(inputs), ref(inputs)
        assert len(a.mtp_logits) == len(b.mtp_logits) == depth
        assert rel_error(a.output, b.output) < 1e-5
        assert a.aux_loss.item() == pytest.approx(b.aux_loss.item(), rel=1e-5, abs=1e-7)
        for x, y in zip(a.mtp_logits, b.mtp_logits):
            assert rel_error(x, y) < 1e-5
        losses_a, losses_b = mtp_losses(a.mtp_logits, targets), mtp_losses(b.mtp_logits, targets)
        for x, y in zip(losses_a, losses_b):
            assert x.item() == pytest.approx(y.item(), rel=1e-5)
        model.zero_grad(), ref.zero_grad()
        for out, losses in ((a, losses_a), (b, losses_b)):
            (F.cross_entropy(out.output.reshape(-1, V), targets.reshape(-1)) + out.aux_loss + mtp_loss(losses, WEIGHT)).backward()
        grads = dict(model.named_parameters())
        assert any(name.startswith("mtp.") for name in grads)
        for name, p in ref.named_parameters():
            assert rel_error(grads[name].grad, p.grad) < 1e-5, name


def test_mtp_loss_equals_a_straightforward_implementation():
    """DeepSeek-V3's definition written out over the program's own modules: depth k on the first S-k positions only
    (no padding), RMSNorm(embed(t[i+k])) ++ RMSNorm(h[i]) -> eh_proj -> block -> norm -> shared head against t[i+k+1]."""
    spec = mtp_spec(2)
    model = build_model(spec).train()
    sequence = _tokens(seed=3)
    inputs, targets = sequence[:, :-1], sequence[:, 1:]
    seq = inputs.shape[1]
    with torch.no_grad():
        out = model(inputs)
        h = model.embed(inputs)
        for block in model.blocks:
            h = block(h)[0]
        expected = []
        for k, module in enumerate(model.mtp, 1):
            e = model.embed(inputs[:, k:])  # token i+k for i < S-k
            h = module.block(module.eh_proj(torch.cat([module.enorm(e), module.hnorm(h[:, : seq - k])], dim=-1)))[0]
            logits = model.head(module.norm(h))
            expected.append(F.cross_entropy(logits.reshape(-1, V), sequence[:, k + 1:].reshape(-1)))
        got = mtp_losses(out.mtp_logits, targets)
    assert [x.item() for x in got] == pytest.approx([x.item() for x in expected], abs=1e-6)
    total = WEIGHT * (expected[0] + expected[1]) / 2
    assert mtp_loss(got, WEIGHT).item() == pytest.approx(total.item(), abs=1e-6)


def test_evaluation_and_generation_ignore_the_mtp_modules():
    """In eval mode the output is the same model's without head.mtp, bit for bit, with no MTP logits; decoding works."""
    with_mtp, without = build_model(mtp_spec(2)).eval(), build_model(mtp_spec(None)).eval()
    inputs = _tokens()[:, :-1]
    with torch.no_grad():
        a, b = with_mtp(inputs), without(inputs)
        assert a.mtp_logits == () and torch.equal(a.output, b.output) and torch.equal(a.aux_loss, b.aux_loss)
        cache = with_mtp.new_cache(2, 16)
        prefill = with_mtp.prefill(inputs, cache)
    assert rel_error(prefill, a.output) < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_parameters_and_flops_count_the_mtp_modules_exactly(case):
    depth, last, tied = CASES[case]
    spec, plain = mtp_spec(depth, last=last, tied=tied), mtp_spec(None, last=last, tied=tied)
    program, plain_program = compile_spec(spec), compile_spec(plain)
    model = build_model(spec, program=program)
    total = sum(p.numel() for p in model.parameters())
    assert program.manifest["parameters"]["total"] == estimate_params(spec) == total
    block = sum(p.numel() for p in model.mtp[0].block.parameters())
    assert total - estimate_params(plain) == depth * (3 * D + 2 * D * D + block)
    routed = 4 * 3 * D * 8 if last != DENSE else 0  # 4 swiglu experts [8, 16]: top 2 of 4 active per token
    active = program.manifest["parameters"]["active_per_token"] - plain_program.manifest["parameters"]["active_per_token"]
    assert active == depth * (3 * D + 2 * D * D + block - routed // 2)
    # per depth: eh_proj [D, 2D], a copy of the last block, the shared head [V, D] (2 FLOPs per multiply-add)
    last_block = block_flops(plain, plain_program.graph, 2)[1][-1]
    extra = flops_per_token(spec, program.graph) - flops_per_token(plain, plain_program.graph)
    assert extra == pytest.approx(depth * (2 * 2 * D * D + last_block + 2 * V * D), rel=1e-12)


def test_training_logs_each_depths_loss_and_balances_the_mtp_experts(tmp_path):
    """Each depth's loss is logged; the MTP blocks' MoE layers are reported and their selection biases move too."""
    from moec.train.trainer import Trainer

    biased = MOE + "          router: {kind: sigmoid_bias, bias_update_rate: 0.01}\n"
    trainer = Trainer(mtp_spec(2, last=biased, steps=3), run_dir=tmp_path / "run", device="cpu")
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["kind"] == "train"]
    assert len(train) == 3
    assert list(train[0]["moe"]) == ["blocks.1.moe", "mtp.0.block.moe", "mtp.1.block.moe"]
    buffers = dict(trainer.model.named_buffers())
    for layer in ("blocks.1.moe", "mtp.0.block.moe", "mtp.1.block.moe"):  # 3 updates of at most 0.01 per expert
        bias = buffers[f"{layer}.router.selection_bias"]
        assert 0 < bias.abs().sum() and bias.abs().max() <= 0.03 + 1e-6
    for row in train:
        depths = [row["mtp_loss_1"], row["mtp_loss_2"]]
        assert all(4.0 < loss < 7.0 for loss in depths)  # about ln(256) = 5.55 at the start
        assert row["mtp_loss"] == pytest.approx(WEIGHT * sum(depths) / 2)
        assert row["loss"] == pytest.approx(row["task_loss"] + row["aux_loss"] + row["mtp_loss"])


def test_hf_export_refuses_the_mtp_modules():
    from moec.interop.errors import NotExportable
    from moec.interop.hf_export import hf_config

    with pytest.raises(NotExportable, match=r"^model\.head\.mtp: this family's checkpoints have no multi-token prediction layers moec writes; remove head\.mtp"):
        hf_config(mtp_spec(1, last=DENSE))
