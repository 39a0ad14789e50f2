"""Consistent-hash expert placement on 2 CPU processes (gloo): the one-process losses, and its
checkpoint (experts saved in id order) resumes on one process and on 4 with another placement."""

import shutil
import sys
from pathlib import Path

import pytest

import moec
from moec.backends.parallel.placement import placement
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.conftest import REPO
from tests.distributed.processes import run_job
from tests.distributed.test_parallel_training import MESHES, single, spec_text, train_losses  # noqa: F401 - single: a fixture

HASHED = MESHES["ep"].replace("experts: [ep]}", "experts: [ep], placement: consistent_hash}")


def train_processes(spec: Path, run_dir: Path, *extra: str, nproc: int = 2) -> None:
    moec_script = Path(sys.executable).parent / "moec"
    done = run_job([str(moec_script), "train", str(spec), "--nproc", str(nproc), "--run-dir", str(run_dir), "--no-plots", *extra],
                   timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_consistent_hash_placement_trains_as_one_process_and_resumes_elsewhere(single, tmp_path):
    assert placement("consistent_hash", 4, 2, 0) == (1, 0, 1, 0)  # not contiguous: the weights' rows are permuted
    spec = tmp_path / "hashed.yaml"
    spec.write_text(spec_text(HASHED))
    run_dir = tmp_path / "run"
    train_processes(spec, run_dir)
    expected = train_losses(single)
    assert train_losses(run_dir) == pytest.approx(expected, rel=1e-5)
    norms = [[r["grad_norm"] for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "train"] for d in (single, run_dir)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    # The step-3 checkpoint holds the experts in id order: one process (no placement) continues the losses ...
    (run_dir / "checkpoints" / "step_00000005").rename(tmp_path / "later")
    elsewhere = tmp_path / "ep4"
    shutil.copytree(run_dir, elsewhere)
    one = moec.load_spec_text(spec_text(), file="single.yaml")
    Trainer(one, run_dir=run_dir, resume="latest", allow_spec_change=True).run()
    assert train_losses(run_dir) == pytest.approx(expected, rel=1e-5)
    # ... and so do 4 expert-parallel processes, whose weights hold the experts in another order
    assert placement("consistent_hash", 4, 4, 0) == (3, 2, 1, 0)
    spec.write_text(spec_text(HASHED.replace("world_size: 2, axes: {ep: 2}", "world_size: 4, axes: {ep: 4}")))
    train_processes(spec, elsewhere, "--resume", "--allow-spec-change", nproc=4)
    assert train_losses(elsewhere) == pytest.approx(expected, rel=1e-5)


def test_parallel_py_shows_the_hashed_placement_and_permutes_the_weights(tmp_path):
    spec = tmp_path / "hashed.yaml"
    spec.write_text(spec_text(HASHED))
    source = moec.compile_spec(moec.load_spec(spec)).parallel_source
    assert (f"EXPERT_PLACEMENT = {{0: (1, 3), 1: (0, 2)}}  # ep rank -> its experts, consistent_hash (seed 0)  # {spec}:20 "
            "sharding.placement\nEXPERT_ORDER = (1, 3, 0, 2)  # the expert in each row of the sharded weights: rank 0's experts, "
            "then rank 1's, ...\n") in source
    body = source.split("def shard_experts")[1].split("\n\n\n")[0].splitlines()
    assert body[-5:] == [
        "        sharded = distribute_tensor(param.detach()[list(EXPERT_ORDER)], ep_mesh, [Shard(0)])",
        "        sharded = torch.nn.Parameter(sharded, requires_grad=param.requires_grad)",
        "        sharded.expert_order = EXPERT_ORDER  # read by dispatch_experts",
        "        module.register_parameter(name, sharded)",
        "    module.expert_order = EXPERT_ORDER  # read by checkpoints",
    ]
    spec.write_text(spec_text(MESHES["ep"]))  # contiguous: no EXPERT_ORDER, the weights keep expert order
    source = moec.compile_spec(moec.load_spec(spec)).parallel_source
    assert "EXPERT_ORDER" not in source and "distribute_tensor(param.detach(), ep_mesh, [Shard(0)])" in source
