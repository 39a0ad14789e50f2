"""``moec train`` on a dp x pp x tp = 2 x 2 x 2 mesh (8 CPU processes, gloo) against one process.

The spec: 4 blocks of GQA attention (4 heads, 2 kv heads: one per tp rank) + a top-2-of-4 MoE whose
experts' hidden units split over tp, with the load-balance loss over the global batch; 2 pipeline
stages, 1F1B over 4 microbatches, each stage's blocks tensor parallel and the vocabulary split over tp
(the first stage's embedding, the last stage's head and its vocab-parallel loss), gradients averaged over dp.
The reference is one process with ``train.grad_accum 4`` (the pipeline's micro-batches). The LR
schedule is constant after warmup, so the 5-step run's checkpoint continues into the 6-step
reference's step 6 on one process.
"""

import shutil
import sys
from pathlib import Path

import pytest

import moec
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.conftest import REPO
from tests.distributed.processes import run_job
from tests.distributed.tp_worker import dense_text
from tests.runtime.helpers import quick_text

STEPS, MICROBATCHES = 5, 4
MESH_3D = ("mesh: {world_size: 8, axes: {dp: 2, pp: 2, tp: 2}}\n"
           "sharding:\n  batch: [dp]\n  tensor: {axis: tp, column: [attention.qkv, experts.up, mlp.up, embed, head]}\n  pipeline: {axis: pp, microbatches: 4, schedule: 1f1b}\n")


def spec_text(steps: int, mesh: str = "") -> str:
    text = quick_text(steps=steps, every=3).replace("repeat: 2", "repeat: 4").replace("heads: 2\n", "heads: 4\n          kv_heads: 2\n")
    text = text.replace("activation: swiglu}\n", "activation: swiglu}\n          aux: {load_balance: 0.01, load_balance_batch: global}\n")
    text = text.replace("warmup_steps: 2}", "kind: constant, warmup_steps: 2}").replace("checkpoint: {every: 3", "checkpoint: {every: 5")
    if not mesh:  # one process, the pipeline's micro-batches as gradient accumulation
        return text.replace("  batch: 8\n", f"  batch: 8\n  grad_accum: {MICROBATCHES}\n")
    return text.replace("schedule:\n", mesh + "schedule:\n")


def rows(run_dir: Path, kind: str, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == kind}


@pytest.mark.slow
def test_tp2_pp2_dp2_gives_the_single_process_run_and_resumes_on_one_process(tmp_path):
    spec = tmp_path / "3d.yaml"
    spec.write_text(spec_text(STEPS, MESH_3D))
    moec_script = Path(sys.executable).parent / "moec"
    done = run_job([str(moec_script), "train", str(spec), "--nproc", "8", "--run-dir", str(tmp_path / "run"), "--no-plots"],
                   timeout=420, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage 0: blocks 0-1 + embeddings on pp rank 0" in done.stdout, done.stdout[-2000:]
    single = tmp_path / "single"
    Trainer(moec.load_spec_text(spec_text(STEPS + 1), file="single.yaml"), run_dir=single).run()
    run_dir = tmp_path / "run"
    for kind, key in (("train", "loss"), ("train", "aux_loss"), ("train", "grad_norm"), ("eval", "val_loss")):
        got, expected = rows(run_dir, kind, key), rows(single, kind, key)
        steps = [step for step in got if step in expected]  # evaluated at 3 by both (then at 5 and 6 at their ends)
        assert steps == ([1, 2, 3, 4, 5] if kind == "train" else [3]), (key, got, expected)
        print("tp2 x pp2 x dp2", key, max(abs(got[s] - expected[s]) for s in steps))
        assert [got[s] for s in steps] == pytest.approx([expected[s] for s in steps], abs=1e-4, rel=1e-4), key
    plan = next(row["memory_plan"] for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == "train")
    print(f"memory plan: held {plan['held']['total_bytes']} B, planned {plan['planned']['total_bytes']} B per rank")
    assert plan["held_over_planned"] == pytest.approx(1.0, abs=0.02), plan
    # the checkpoint of step 5 (tp shards as DTensors, each stage's tensors under the whole model's names)
    # continues on one process into the reference's step 6
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    Trainer(moec.load_spec_text(spec_text(STEPS + 1), file="single.yaml"), run_dir=resumed, resume="latest",
            allow_spec_change=True).run()
    assert rows(resumed, "train", "loss")[STEPS + 1] == pytest.approx(rows(single, "train", "loss")[STEPS + 1], abs=1e-4, rel=1e-4)



@pytest.mark.slow
def test_pp2_tp2_with_sequence_parallelism_gives_the_single_process_run(tmp_path):
    """A dense model (attention with 4 heads and 1 KV head, replicated on both tp ranks, + SwiGLU MLP, no aux
    loss: its stages send zeros), sequence parallel inside each stage: the first stage splits the sequence after
    the embeddings, the last gathers it before the head, the norms' and the whole wk / wv's gradients are summed
    over tp; the vocabulary is split too. 4 processes against one process with grad_accum 4."""
    mesh = ("mesh: {world_size: 4, axes: {pp: 2, tp: 2}}\nsharding:\n  tensor: {axis: tp, sequence_parallel: true, column: [attention.qkv, experts.up, mlp.up, embed, head]}\n"
            "  pipeline: {axis: pp, microbatches: 4}\n")
    spec = tmp_path / "sp.yaml"
    spec.write_text(dense_text(mesh, kv_heads=1))
    moec_script = Path(sys.executable).parent / "moec"
    done = run_job([str(moec_script), "train", str(spec), "--nproc", "4", "--run-dir", str(tmp_path / "run"), "--no-plots"],
                   timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    single = tmp_path / "single"
    one = dense_text(kv_heads=1).replace("  batch: 8\n", f"  batch: 8\n  grad_accum: {MICROBATCHES}\n")
    Trainer(moec.load_spec_text(one, file="single.yaml"), run_dir=single).run()
    for kind, key in (("train", "loss"), ("train", "grad_norm"), ("eval", "val_loss")):
        got, expected = rows(tmp_path / "run", kind, key), rows(single, kind, key)
        print("pp2 x tp2 SP", key, max(abs(got[s] - expected[s]) for s in got))
        assert list(got) == list(expected) and got, (key, got, expected)
        assert list(got.values()) == pytest.approx(list(expected.values()), abs=1e-5, rel=1e-5), key
