"""``moec train`` with pipeline parallelism (moec.train.pipeline_step) on 2 and 4 CPU processes (gloo).

The spec: 4 blocks of GQA attention (2 heads, 1 kv head) + a top-2-of-4 MoE with its load-balance loss,
cut into 2 stages, 4 microbatches per step. A pipeline runs its microbatches one by one, so each one's
load-balance loss covers its own rows: the reference is one process with ``train.grad_accum 4``, which
reads the same micro-batches. Under data parallelism the counts of a microbatch are summed over the
data-parallel ranks (``load_balance_batch: global``), so every layout computes the one-process losses;
under expert parallelism (ep a batch axis) the ep ranks of a stage send their routed rows to each other.
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
from tests.runtime.helpers import quick_text

STEPS, MICROBATCHES = 5, 4
LAYOUTS = {  # name: (processes, mesh and sharding lines)
    "pp2 1f1b": (2, "mesh: {world_size: 2, axes: {pp: 2}}\nsharding: {pipeline: {axis: pp, microbatches: 4, schedule: 1f1b}}\n"),
    "pp2 gpipe": (2, "mesh: {world_size: 2, axes: {pp: 2}}\nsharding: {pipeline: {axis: pp, microbatches: 4, schedule: gpipe}}\n"),
    # FSDP2 on each stage over dp (one unit per block, then the stage), 4 processes
    "fsdp2 x pp2": (4, ("mesh: {world_size: 4, axes: {dp: 2, pp: 2}}\n"
                        "sharding: {batch: [dp], fsdp: [dp], pipeline: {axis: pp, microbatches: 4, schedule: 1f1b}}\n")),
    # expert parallelism inside each stage: the 2 ep ranks of a stage split its batch slice and its experts, 4 processes
    "pp2 x ep2": (4, ("mesh: {world_size: 4, axes: {pp: 2, ep: 2}}\n"
                      "sharding: {batch: [ep], experts: [ep], pipeline: {axis: pp, microbatches: 4, schedule: 1f1b}}\n")),
}
# the fuller stage (blocks 2-3 and the head) on one rank of pp 2 alone, and its routed experts' share: 2 blocks x 4 experts
# x (up, gate, down) of 32 x 32, fp32, each counted 4 times (weight, gradient, AdamW's two moments)
PP2_BYTES, STAGE_EXPERT_BYTES = 629_248, 2 * 4 * 3 * 32 * 32 * 4 * 4


def spec_text(layout: str = "") -> str:
    text = quick_text(steps=STEPS, every=3).replace("repeat: 2", "repeat: 4").replace("heads: 2\n", "heads: 2\n          kv_heads: 1\n")
    text = text.replace("activation: swiglu}\n", "activation: swiglu}\n          aux: {load_balance: 0.01, load_balance_batch: global}\n")
    if not layout:  # one process, the pipeline's micro-batches as gradient accumulation
        return text.replace("  batch: 8\n", f"  batch: 8\n  grad_accum: {MICROBATCHES}\n")
    return text.replace("schedule:\n", LAYOUTS[layout][1] + "schedule:\n")


def rows(run_dir: Path, kind: str, key: str) -> list[float]:
    return [row[key] for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == kind]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    Trainer(moec.load_spec_text(spec_text(), file="single.yaml"), run_dir=run_dir).run()
    return run_dir


def train_on_processes(tmp_path: Path, layout: str):
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(spec_text(layout))
    moec_script = Path(sys.executable).parent / "moec"
    done = run_job([str(moec_script), "train", str(spec), "--nproc", str(LAYOUTS[layout][0]), "--run-dir", str(tmp_path / "run"),
                    "--no-plots"], timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "run", done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_gives_the_single_process_run_and_resumes_on_one_process(layout, single, tmp_path):
    run_dir, stdout = train_on_processes(tmp_path, layout)
    # moec train prints the split it runs (blocks balanced by forward FLOPs: the head weighs on the last stage)
    assert "stage 0: blocks 0-1 + embeddings on pp rank 0" in stdout and "stage 1: blocks 2-3 + final norm, head on pp rank 1" in stdout
    for kind, key in (("train", "loss"), ("train", "aux_loss"), ("train", "grad_norm"), ("eval", "val_loss")):
        expected, got = rows(single, kind, key), rows(run_dir, kind, key)
        print(layout, key, max(abs(a - b) for a, b in zip(got, expected)))
        assert len(got) == len(expected) and got == pytest.approx(expected, abs=1e-5, rel=1e-5), key
    # every stage's MoE layers reach the metrics row: expert loads of blocks 0-3, equal to one process's
    first = next(row["moe"] for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == "train")
    reference = next(row["moe"] for row in read_metrics(single / "metrics.jsonl") if row["kind"] == "train")
    assert list(first) == [f"blocks.{i}.moe" for i in range(4)]
    loads = [share for k in first for share in first[k]["utilization"]]
    assert loads == pytest.approx([share for k in first for share in reference[k]["utilization"]], abs=1e-6)
    plan = next(row["memory_plan"] for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == "train")
    assert plan["held_over_planned"] == pytest.approx(1.0, abs=0.02), plan  # the costliest stage holds what the manifest plans
    if "ep2" in layout:  # each rank keeps its half of its stage's experts, and routed rows travel over the ep group
        assert plan["held"]["total_bytes"] == plan["planned"]["total_bytes"] == PP2_BYTES - STAGE_EXPERT_BYTES // 2, plan
        assert all(row["expert_parallel_bytes_sent"] > 0 for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == "train")
    if layout == "pp2 gpipe":
        return
    # the checkpoint of step 3 (each stage's tensors under the whole model's names) resumes on one process
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000005")
    Trainer(moec.load_spec_text(spec_text(), file="single.yaml"), run_dir=resumed, resume="latest", allow_spec_change=True).run()
    assert rows(resumed, "train", "loss") == pytest.approx(rows(single, "train", "loss"), abs=1e-5, rel=1e-5)
