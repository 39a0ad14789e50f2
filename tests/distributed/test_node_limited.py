"""Deduplicated, node-limited expert dispatch on deepseek_v3_tiny against the single-process run.

deepseek_v3_tiny routes each token to 4 of 16 experts from its 2 best of 4 groups; with contiguous placement
over ep 2 or 4 the groups line up with the ranks, so a token's rows reach at most 2 ranks (router.top_groups),
and a token with several experts on one rank sends that rank one row. The spec's head.mtp stays: its block's MoE
layer dispatches as the model's do (its experts split over ep too), and its loss term is compared as well. The
sequence-wise balance loss stays; the run is shortened (3 steps, no compile) and given a local text corpus.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moec
from moec.backends.parallel.placement import node_limit
from moec.backends.torch.experts import dispatch_experts, plan_dispatch
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.conftest import REPO
from tests.distributed.processes import run_job

MESHES = {
    "ep2": ("mesh: {world_size: 2, axes: {ep: 2}}\nsharding: {batch: [ep], experts: [ep]}\n", 2),
    "ep4": ("mesh: {world_size: 4, axes: {ep: 4}}\nsharding: {batch: [ep], experts: [ep]}\n", 4),
    "dp2_ep2": ("mesh: {world_size: 4, axes: {dp: 2, ep: 2}}\nsharding: {batch: [dp, ep], experts: [ep]}\n", 4),
}
RUN = """schedule:
  compile: {enabled: false}
  deterministic: true
train:
  seed: 0
  steps: 3
  batch: 8
  seq_len: 32
  optimizer: {lr: 3.0e-3}
  lr_schedule: {warmup_steps: 2}
  data: {kind: text, files: ["stdlib:json/*.py"]}
  checkpoint: {every: 3, keep_last: 1}
  eval: {every: 3, batches: 2}
"""


def tiny_text(mesh: str = "") -> str:
    text = (REPO / "specs" / "deepseek_v3_tiny.yaml").read_text()
    assert "  head: {kind: lm, mtp: {depth: 1, weight: 0.3}}\n" in text
    return text[:text.index("train:")] + mesh + RUN


def rows(run_dir: Path, kind: str) -> list[dict]:
    return [row for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == kind]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    Trainer(moec.load_spec_text(tiny_text(), file="single.yaml"), run_dir=run_dir).run()
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(MESHES))
def test_node_limited_dispatch_gives_the_single_process_run(kind, single, tmp_path):
    mesh, processes = MESHES[kind]
    spec = tmp_path / f"{kind}.yaml"
    spec.write_text(tiny_text(mesh))
    done = run_job([str(Path(sys.executable).parent / "moec"), "train", str(spec), "--nproc", str(processes),
                    "--run-dir", str(tmp_path / "run"), "--no-plots"], timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "run"
    for row_kind, key in (("train", "loss"), ("train", "mtp_loss"), ("train", "grad_norm"), ("eval", "val_loss")):
        got, expected = ([row[key] for row in rows(d, row_kind)] for d in (run_dir, single))
        assert len(got) == len(expected) > 0 and got == pytest.approx(expected, rel=1e-5), (key, got, expected)
    train = rows(run_dir, "train")
    for row in train:
        assert 0 < row["expert_parallel_bytes_sent"] < row["expert_parallel_bytes_undeduplicated"], row
        assert row["expert_parallel_destinations"] <= 2  # router.top_groups: the groups line up with the ranks
    print(kind, [(row["expert_parallel_bytes_sent"], row["expert_parallel_bytes_undeduplicated"]) for row in train])
    source = moec.compile_spec(moec.load_spec_text(tiny_text(mesh), file=f"{kind}.yaml")).parallel_source
    assert "# node-limited: router.groups 4 over ep" in source


def test_a_token_with_two_experts_on_one_rank_sends_it_one_row():
    """plan_dispatch: rows per (token, destination), pairs per (token, choice) in destination order."""
    rank_of = torch.tensor([[0, 0, 1], [1, 1, 1]])  # token 0: two experts on rank 0, one on rank 1; token 1: rank 1 only
    local_of = torch.tensor([[2, 0, 1], [0, 3, 1]])
    plan = plan_dispatch(rank_of, local_of, ranks=2)
    assert plan.row_sizes == [1, 2] and plan.pair_sizes == [2, 4] and plan.destinations == 2
    assert plan.row_token.tolist() == [0, 0, 1]  # to rank 0: token 0; to rank 1: tokens 0 and 1
    assert plan.row_place.tolist() == [0, 1, 0]  # rank 1 is token 0's second destination
    assert plan.pair_order.tolist() == [0, 1, 2, 3, 4, 5]
    assert plan.pair_ints.tolist() == [[2, 0], [0, 0], [1, 0], [0, 1], [3, 1], [1, 1]]  # (local expert, row in message)


def test_dispatch_experts_on_one_process_sums_each_tokens_experts_in_choice_order():
    torch.manual_seed(0)
    x, weights = torch.randn(5, 8), torch.rand(5, 3)
    chosen = torch.tensor([[0, 1, 2], [3, 0, 1], [2, 3, 0], [1, 2, 3], [0, 2, 1]])
    w_up, w_gate, w_down = torch.randn(4, 6, 8), torch.randn(4, 6, 8), torch.randn(4, 8, 6)
    out = dispatch_experts(x, chosen, weights, torch.stack([w_gate, w_up], 1), w_down, "silu")  # w_gate_up [E, 2, H, D]
    for n in range(5):
        expected = sum(weights[n, j] * w_down[e] @ (F.silu(w_gate[e] @ x[n]) * (w_up[e] @ x[n]))
                       for j, e in enumerate(chosen[n].tolist()))
        torch.testing.assert_close(out[n], expected, rtol=1e-5, atol=1e-5)


def test_groups_bound_the_destinations_only_when_they_line_up_with_the_ranks():
    assert node_limit(4, 2, "contiguous", 2) == 2 and node_limit(4, 2, "contiguous", 4) == 2  # 2 groups, 1 group per rank
    assert node_limit(8, 4, "contiguous", 8) == 4  # deepseek_v3_671b.yaml: 8 groups over ep 8, top 4
    assert node_limit(4, 2, "contiguous", 8) is None  # a group split over 2 ranks
    assert node_limit(4, 2, "consistent_hash", 2) is None and node_limit(1, 1, "contiguous", 2) is None
