"""Context parallelism (``sharding.sequence``) on 2 and 4 CPU processes (gloo) against one process.

Each rank holds chunks r and 2cp-1-r of every sequence; attention gathers the keys and values of
the whole sequence; the MoE layers sum their expert counts over the cp ranks. A token model with
GQA attention and MoE layers must train as one process does: the same losses, gradient norms and
validation losses over 5 steps.
"""

import sys
from pathlib import Path

import pytest
import torch

import moec
from moec.backends.torch.context_parallel import load_balanced_positions
from moec.distributed.processes import DistContext, local_slice
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.conftest import REPO
from tests.distributed.processes import run_job
from tests.runtime.helpers import quick_text

MESHES = {
    "cp2": ("mesh: {world_size: 2, axes: {cp: 2}}\nsharding: {sequence: [cp]}\n", 2),
    "cp4": ("mesh: {world_size: 4, axes: {cp: 4}}\nsharding: {sequence: [cp]}\n", 4),
    "dp2_cp2": ("mesh: {world_size: 4, axes: {dp: 2, cp: 2}}\nsharding: {batch: [dp], sequence: [cp]}\n", 4),
    "fsdp2_cp2": ("mesh: {world_size: 4, axes: {dp: 2, cp: 2}}\nsharding: {batch: [dp], fsdp: [dp], sequence: [cp]}\n", 4),
}
GLOBAL_BALANCE = ("dp2_cp2", "fsdp2_cp2")  # dp ranks differ from one process unless the counts span the batch


def spec_text(mesh: str = "", balance: str = "local") -> str:
    """quick.yaml with GQA attention (4 heads, 2 KV heads) and the MoE's load-balance loss over ``balance`` counts."""
    text = quick_text(steps=5, every=3).replace("schedule:\n", mesh + "schedule:\n")
    text = text.replace("          heads: 2\n", "          heads: 4\n          kv_heads: 2\n")
    return text.replace("activation: swiglu}\n", "activation: swiglu}\n"
                        f"          aux: {{load_balance: 0.01, z_loss: 0.001, load_balance_batch: {balance}}}\n")


def rows(run_dir: Path, kind: str, key: str) -> list[float]:
    return [row[key] for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == kind]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, per load-balance convention."""
    runs = {}
    for balance in ("local", "global"):
        run_dir = tmp_path_factory.mktemp(f"single_{balance}")
        Trainer(moec.load_spec_text(spec_text(balance=balance), file="single.yaml"), run_dir=run_dir).run()
        runs[balance] = run_dir
    return runs


def test_each_rank_holds_chunks_r_and_2cp_minus_1_minus_r():
    assert load_balanced_positions(4, 0, 2).tolist() == [0, 1, 6, 7]
    assert load_balanced_positions(4, 1, 2).tolist() == [2, 3, 4, 5]
    held = torch.cat([load_balanced_positions(2, r, 4) for r in range(4)])
    assert sorted(held.tolist()) == list(range(8))
    batch = torch.arange(2 * 8).view(2, 8)
    part = local_slice(batch, DistContext(world_size=4, dp_rank=1, dp_size=2, cp_rank=1, cp_size=2))
    assert part.tolist() == [[10, 11, 12, 13]]  # row 1, positions 2..5


def test_the_program_shows_the_split():
    spec = moec.load_spec_text(spec_text(MESHES["dp2_cp2"][0]), file="cp.yaml")
    program = moec.compile_spec(spec)
    assert "attn = context_attention(q, k, v, 4, 2, 8, True, None, self.context)" in program.source
    assert "positions = self.context.positions(x)" in program.source
    assert "self.batch_group = None  # the group of the ranks holding the batch's tokens" in program.source
    parallel = program.parallel_source
    assert "CONTEXT_PARALLEL = ('cp',)" in parallel
    assert "use_context_parallel(model, mesh['cp'].get_group())" in parallel
    assert "use_batch_group(model, mesh['cp'].get_group())" in parallel
    assert "dp_mesh = mesh[('dp', 'cp')]._flatten('dp_cp')" in parallel
    one = moec.compile_spec(moec.load_spec_text(spec_text(), file="one.yaml")).source
    assert "self.context" not in one and "context_attention" not in one  # without sharding.sequence: the plain program


def test_the_context_parallel_program_runs_on_one_process():
    """Without parallel.py (generation, evaluation on one process) the attention layers' context is None."""
    spec = moec.load_spec_text(spec_text(MESHES["cp2"][0]), file="cp.yaml")
    model = moec.build_model(spec)
    plain = moec.build_model(moec.load_spec_text(spec_text(), file="one.yaml"))
    plain.load_state_dict(model.state_dict())
    inputs = model.example_inputs(batch=2, seq=16)
    torch.testing.assert_close(model(*inputs).output, plain(*inputs).output)


def run_processes(tmp_path: Path, kind: str) -> Path:
    mesh, nproc = MESHES[kind]
    spec = tmp_path / f"{kind}.yaml"
    spec.write_text(spec_text(mesh, "global" if kind in GLOBAL_BALANCE else "local"))
    # python -m from the repository root: this checkout's moec, also where the venv's moec script is another's
    done = run_job([sys.executable, "-m", "moec.cli.main", "train", str(spec), "--nproc", str(nproc), "--run-dir", str(tmp_path / "run"),
                    "--no-plots"], timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(MESHES))
def test_context_parallel_training_gives_the_single_process_numbers(kind, single, tmp_path):
    run_dir = run_processes(tmp_path, kind)
    reference = single["global" if kind in GLOBAL_BALANCE else "local"]
    for what, key in (("train", "loss"), ("train", "aux_loss"), ("train", "grad_norm"), ("eval", "val_loss")):
        got, expected = rows(run_dir, what, key), rows(reference, what, key)
        assert len(got) == len(expected) > 0, (key, got, expected)
        worst = max(abs(a - b) for a, b in zip(got, expected))
        print(f"{kind} {key}: max |difference| {worst:.2e} over {len(got)} rows")
        assert worst <= 1e-5, (key, got, expected)
    if kind == "fsdp2_cp2":  # its checkpoint (FSDP2's DTensors over dp x cp) resumes on one process: the same steps 4-5
        (run_dir / "checkpoints" / "step_00000005").rename(tmp_path / "later")
        resumed = tmp_path / "resumed"
        run_dir.rename(resumed)
        spec = moec.load_spec_text(spec_text(balance="global"), file="single.yaml")
        Trainer(spec, run_dir=resumed, resume="latest", allow_spec_change=True).run()
        got, expected = rows(resumed, "train", "loss"), rows(reference, "train", "loss")
        print(f"{kind} resumed on one process: max |difference| {max(abs(a - b) for a, b in zip(got, expected)):.2e}")
        assert got == pytest.approx(expected, abs=1e-5)
