"""Tensor parallelism of MLA on ``specs/deepseek_v3_tiny.yaml``: 2 CPU processes (gloo) against one process.

The heads split over tp as in torchtitan's deepseek_v3: wq_b (wq with q_lora_rank 0) and wkv_b by columns, wo by
rows; the latent projections and norms (wq_a, q_norm, wkv_a, kv_norm) whole on every rank. The MoE blocks stay whole
(experts.up is not in the column list: tensor parallelism of experts refuses shared experts). The spec's head.mtp
module runs too: its block splits as the last block does (parallel.py's plan on ``model.mtp[0].block``), its
norms and eh_proj stay whole, and with the head split along the vocabulary its logits' loss reduces over tp.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

import moec
from moec.compile import build_model, compile_spec
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.conftest import REPO
from tests.distributed.mla_tp_worker import TP2, deepseek_text, sequence_parallel
from tests.distributed.processes import run_job
from tests.distributed.test_tensor_parallel import assert_same_run, rows


def train(run_dir: Path, text: str, nproc: int = 1) -> Path:
    """``moec train`` of ``text`` on ``nproc`` processes (in this process when 1)."""
    if nproc == 1:
        Trainer(moec.load_spec_text(text, file="single.yaml"), run_dir=run_dir).run()
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = run_dir / "spec.yaml"
    spec.write_text(text)
    moec_script = Path(sys.executable).parent / "moec"
    done = run_job([str(moec_script), "train", str(spec), "--nproc", str(nproc), "--run-dir", str(run_dir / "run"), "--no-plots"],
                   timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir / "run"


def assert_same_as_one_process(run_dir: Path, single: Path) -> None:
    """``assert_same_run`` (losses, gradient norms, validation losses within 1e-5; the memory plan) and with head.mtp
    its loss term, printing the largest relative differences."""
    assert_same_run(run_dir, single)
    keys = [("train", "loss"), ("train", "grad_norm"), ("eval", "val_loss")]
    if "mtp_loss" in read_metrics(single / "metrics.jsonl")[0]:  # head.mtp's weighted term, which loss includes
        assert rows(run_dir, "train", "mtp_loss") == pytest.approx(rows(single, "train", "mtp_loss"), rel=1e-5)
        keys.append(("train", "mtp_loss"))
    for kind, key in keys:
        worst = max(abs(a - b) / abs(b) for a, b in zip(rows(run_dir, kind, key), rows(single, kind, key)))
        print(f"{run_dir.parent.name} {key}: largest relative difference {worst:.2g}")


def test_tp2_mla_forward_and_gradients_equal_one_process(tmp_path):
    out = tmp_path / "diffs.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tests.distributed.mla_tp_worker", str(out)]
    done = run_job(command, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    # head.mtp adds 17 parameters (q_lora, vocab), 15 (plain_q), 20 (bias): its norms, eh_proj and block
    for case, params in (("q_lora", 76), ("plain_q", 66), ("bias", 91), ("vocab", 76), ("sequence_parallel", 27)):
        diffs = results[case]
        assert diffs["weights"] == 0.0 and diffs["output"] < 1e-5 and diffs["aux_loss"] < 1e-5, (case, diffs)
        assert len(diffs["mtp_logits"]) == (0 if case == "sequence_parallel" else 1) and max(diffs["mtp_logits"], default=0) < 1e-5
        assert len(diffs["grads"]) == params and max(diffs["grads"].values()) < 1e-5, (case, diffs["grads"])
        assert not any(part in name for name in diffs["split"] for part in ("wq_a", "q_norm", "wkv_a", "kv_norm"))
    shapes = results["q_lora"]["local_shapes"]  # 4 heads -> 2 per rank: (16 + 8) query, (16 + 16) key-value dims each
    assert shapes["blocks.0.mla.wq_b.weight"] == [48, 32] and shapes["blocks.0.mla.wkv_b.weight"] == [64, 32]
    assert shapes["blocks.0.mla.wo.weight"] == [64, 32] and results["plain_q"]["local_shapes"]["blocks.0.mla.wq.weight"] == [48, 64]
    assert results["bias"]["local_shapes"]["blocks.0.mla.wo.bias"] == [64]  # added once, after the sum over tp
    assert shapes["mtp.0.block.mla.wq_b.weight"] == [48, 32] and shapes["mtp.0.block.mla.wo.weight"] == [64, 32]
    assert not any(name.startswith("mtp.0.") and ".block." not in name for name in results["q_lora"]["split"])
    assert results["vocab"]["local_shapes"]["head.weight"] == [128, 64]  # the shared head: this rank's 128 of 256 tokens


def test_the_mla_plan_and_model_lines():
    """parallel.py splits the per-head projections; model.py counts the local heads and sends the whole rope key
    into them through f, and still runs whole on one process."""
    program = compile_spec(moec.load_spec_text(deepseek_text(TP2), file="tp.yaml"))
    plan = [line.split("  # ")[0] for line in program.parallel_source.split("def tensor_parallel(")[1].splitlines()]
    for target in ("model.blocks[2]", "model.mtp[0].block"):  # the MTP block splits as the last block does
        start = plan.index(f"    parallelize_module({target}, tp_mesh, {{")
        assert plan[start + 1:start + 5] == [
            "        'mla.wq_b': ColwiseParallel(),",
            "        'mla.wkv_b': ColwiseParallel(),",
            "        'mla.wo': RowwiseParallel(),",
            "    })",
        ]
    forward = [line.split("  # ")[0] for line in program.source.split("\nclass MLA(nn.Module):\n")[1].split("\n\n\n")[0].splitlines()]
    for line in ("        q_nope, q_pe = split_heads(q, q.shape[-1] // 24, (16, 8))",
                 "        q_pe = rope(q_pe, q_pe.shape[-1] // 8, 8, 10000.0, positions, interleaved=True)",
                 "        k_pe = rope(k_pe, 1, 8, 10000.0, positions, interleaved=True)",
                 "        k_nope, v = split_heads(kv, kv.shape[-1] // 32, (16, 16))",
                 "        k_pe = copy_to_shards(k_pe, self.wkv_b.weight)",
                 "        attn = mla_attention(q_nope, q_pe, k_nope, k_pe, v, q_nope.shape[-1] // 16, 0.2041241452319315, positions)"):
        assert line in forward, line
    whole, split = (build_model(moec.load_spec_text(text, file="tp.yaml")) for text in (deepseek_text(), deepseek_text(TP2)))
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(whole(tokens).output, split(tokens).output)  # on one process f is the identity


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train(tmp_path_factory.mktemp("single"), deepseek_text())


@pytest.mark.slow
def test_tp2_deepseek_v3_tiny_trains_like_one_process(single, tmp_path):
    assert_same_as_one_process(train(tmp_path / "tp2", deepseek_text(TP2), nproc=2), single)


@pytest.mark.slow
def test_tp2_sequence_parallel_mla_trains_like_one_process(tmp_path):
    """Megatron-SP around MLA: its norm on S / tp positions, its input gathered, so the q and kv latents and their
    norms run on the whole sequence, whole on every rank (the dense blocks: SP runs no MoE layer)."""
    single = train(tmp_path / "single", deepseek_text(dense=True))
    assert_same_as_one_process(train(tmp_path / "sp", deepseek_text(sequence_parallel(), dense=True), nproc=2), single)
