"""Data and expert parallelism on 2 and 4 CPU processes (gloo) against the single-process run.

The MoE load-balance loss counts tokens over the global batch (``load_balance_batch: global``):
with the default per-rank counts (the per-micro-batch convention of Megatron and torchtitan) a
2-rank run would be the single-process run with 2 gradient-accumulation micro-batches, not one.
"""

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import moec
from moec.cli.main import app
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.conftest import REPO
from tests.distributed.processes import run_job
from tests.runtime.helpers import quick_text

MESHES = {
    "ddp": "mesh: {world_size: 2, axes: {dp: 2}}\nsharding: {batch: [dp]}\n",
    "fsdp": "mesh: {world_size: 2, axes: {fsdp: 2}}\nsharding: {batch: [fsdp], fsdp: [fsdp]}\n",
    "ep": "mesh: {world_size: 2, axes: {ep: 2}}\nsharding: {batch: [ep], experts: [ep]}\n",
    "dp_ep": "mesh: {world_size: 4, axes: {dp: 2, ep: 2}}\nsharding: {batch: [dp, ep], experts: [ep]}\n",
    "ep_fsdp": "mesh: {world_size: 2, axes: {ep: 2}}\nsharding: {batch: [ep], fsdp: [ep], experts: [ep]}\n",
    "fsdp_ep": "mesh: {world_size: 4, axes: {fsdp: 2, ep: 2}}\nsharding: {batch: [fsdp, ep], fsdp: [fsdp, ep], experts: [ep]}\n",
    # spectral_moe.yaml's layout: ep does not split the batch (ep ranks share their dp slice's tokens)
    "dp_ep_shared": "mesh: {world_size: 4, axes: {dp: 2, ep: 2}}\nsharding: {batch: [dp], experts: [ep]}\n",
    # moe_basics.yaml's layout: HSDP (replicate over ep, shard over fsdp, listed first) and experts over ep, then fsdp
    "hsdp_ep": "mesh: {world_size: 4, axes: {fsdp: 2, ep: 2}}\nsharding: {batch: [fsdp, ep], fsdp: [fsdp], experts: [ep]}\n",
}
PROCESSES = {"ddp": 2, "fsdp": 2, "ep": 2, "dp_ep": 4, "ep_fsdp": 2, "fsdp_ep": 4, "dp_ep_shared": 4, "hsdp_ep": 4}
EXPERT_PARALLEL = ("ep", "dp_ep", "ep_fsdp", "fsdp_ep", "dp_ep_shared", "hsdp_ep")
FINISHED: dict[str, list[float]] = {}  # kind -> losses of the run above, for the determinism test


def spec_text(mesh: str = "") -> str:
    text = quick_text(steps=5, every=3).replace("schedule:\n", mesh + "schedule:\n")
    return text.replace("activation: swiglu}\n", "activation: swiglu}\n          aux: {load_balance: 0.01, load_balance_batch: global}\n")


def train_losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == "train"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    Trainer(moec.load_spec_text(spec_text(), file="single.yaml"), run_dir=run_dir).run()
    return run_dir


def run_processes(tmp_path: Path, kind: str, text: str | None = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = tmp_path / f"{kind}.yaml"
    spec.write_text(text or spec_text(MESHES[kind]))
    moec_script = Path(sys.executable).parent / "moec"
    done = run_job([str(moec_script), "train", str(spec), "--nproc", str(PROCESSES[kind]), "--run-dir", str(tmp_path / "run"),
                    "--no-plots"], timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(MESHES))
def test_several_processes_give_the_single_process_losses(kind, single, tmp_path):
    run_dir = run_processes(tmp_path, kind)
    FINISHED[kind] = train_losses(run_dir)
    expected, got = train_losses(single), train_losses(run_dir)
    assert len(got) == 5 and got == pytest.approx(expected, rel=1e-5)
    # The gradient norm covers every parameter: expert gradients reduced over the wrong ranks (scaled by
    # the ep size) would change it, while AdamW's update (and so the loss) would hardly move.
    norms = [[r["grad_norm"] for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "train"] for d in (single, run_dir)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    if kind in EXPERT_PARALLEL:  # only routed rows leave a rank: at most every (token, choice) row, there and back, fwd + bwd
        every_row = 8 * 32 * 2 * 32 * 4 * 2 * 2 * 2  # batch x seq x top_k x d_model x fp32 x (there, back) x (fwd, bwd) x layers
        sent = [r["expert_parallel_bytes_sent"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
        assert all(0 < b < every_row for b in sent), sent
    # the memory plan, checked: each rank's parameter + gradient + AdamW bytes (the largest over ranks) against the manifest
    plan = next(r["memory_plan"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train")
    assert plan["held_over_planned"] == pytest.approx(1.0, abs=0.02), plan
    print(f"memory plan {kind}: held {plan['held']['total_bytes']} B, planned {plan['planned']['total_bytes']} B per rank")
    evals = [r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals == pytest.approx([r["val_loss"] for r in read_metrics(single / "metrics.jsonl") if r["kind"] == "eval"], rel=1e-5)
    if kind in ("fsdp", "dp_ep", "fsdp_ep", "dp_ep_shared", "hsdp_ep"):  # a checkpoint of sharded DTensors (FSDP2, experts over ep) resumes on 1 process
        resumed = tmp_path / "resumed"
        (tmp_path / "run" / "checkpoints" / "step_00000005").rename(tmp_path / "later")
        (tmp_path / "run").rename(resumed)
        spec = moec.load_spec_text(spec_text(), file="single.yaml")
        Trainer(spec, run_dir=resumed, resume="latest", allow_spec_change=True).run()
        assert train_losses(resumed) == pytest.approx(expected, rel=1e-5)


GPT_OSS_EXPERTS = "activation: clamped_swiglu, bias: true, swiglu_limit: 7.0, swiglu_alpha: 1.702}"


def gpt_oss_experts(text: str) -> str:
    """GPT-OSS's experts: clamped SwiGLU with up / gate / down biases."""
    assert "activation: swiglu}" in text
    return text.replace("activation: swiglu}", GPT_OSS_EXPERTS)


@pytest.mark.slow
def test_gpt_oss_experts_under_expert_parallelism_give_the_single_process_losses(tmp_path):
    """The expert-parallel FFN applies the clamped activation and each local expert's biases (sharded over ep
    with the weights): it computed sigmoid(gate) * up for clamped_swiglu before, and refused biases."""
    single = tmp_path / "single"
    Trainer(moec.load_spec_text(gpt_oss_experts(spec_text()), file="single.yaml"), run_dir=single).run()
    text = gpt_oss_experts(spec_text(MESHES["ep"]))
    run_dir = run_processes(tmp_path / "ep", "ep", text)
    source = moec.compile_spec(moec.load_spec_text(text, file="ep.yaml")).source
    assert ("dispatch_experts(x, chosen, weights, self.experts.w_gate_up, self.experts.w_down, 'clamped_glu', "
            "biases=(self.experts.b_gate_up, self.experts.b_down), clamp=(7.0, 1.702))") in source
    for kind, key in (("train", "loss"), ("train", "grad_norm"), ("eval", "val_loss")):
        got, expected = ([r[key] for r in read_metrics(d / "metrics.jsonl") if r["kind"] == kind] for d in (run_dir, single))
        assert len(got) == len(expected) > 0 and got == pytest.approx(expected, rel=1e-5), (key, got, expected)


@pytest.mark.slow
def test_two_expert_parallel_runs_are_bitwise_identical(tmp_path):
    """schedule.deterministic on the CPU: the all-to-all exchange and the reductions repeat exactly."""
    first = FINISHED.get("ep") or train_losses(run_processes(tmp_path / "first", "ep"))
    second = train_losses(run_processes(tmp_path / "second", "ep"))
    assert second == first  # exact float equality, every step


def test_a_world_size_that_differs_from_the_mesh_is_one_line(tmp_path):
    spec = tmp_path / "ddp.yaml"
    spec.write_text(spec_text(MESHES["ddp"]))
    result = CliRunner().invoke(app, ["train", str(spec), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert result.stderr == ("error: the spec's mesh has world_size 2, but 1 process(es) were started "
                             "(use moec train --nproc 2, or torchrun --nproc-per-node 2)\n")
    result = CliRunner().invoke(app, ["train", str(spec), "--nproc", "3", "--run-dir", str(tmp_path / "run")])
    assert (result.exit_code, result.stderr) == (1, "error: the spec's mesh has world_size 2, but --nproc is 3\n")


def test_parallel_py_applies_the_plan_with_spec_lines(tmp_path):
    for kind in ("ddp", "fsdp", "ep", "fsdp_ep"):
        (tmp_path / f"{kind}.yaml").write_text(spec_text(MESHES[kind]))
        program = moec.compile_spec(moec.load_spec(tmp_path / f"{kind}.yaml"))
        body = program.parallel_source.split("def parallelize")[1].splitlines()
        where = f"{tmp_path / kind}.yaml"
        axes = {"ddp": "dp", "fsdp": "fsdp", "ep": "ep", "fsdp_ep": "fsdp x ep"}[kind]
        group = {"ddp": "mesh['dp']", "fsdp": "mesh['fsdp']", "ep": "mesh['ep']", "fsdp_ep": "mesh[('fsdp', 'ep')]._flatten('fsdp_ep')"}[kind]
        assert body[2 + (kind in ("ep", "fsdp_ep"))] == (  # the ranks whose expert counts the load-balance loss sums
            f"    use_batch_group(model, {group}.get_group())  # aux.load_balance_batch 'global': expert counts summed over "
            f"{axes}  # {where}:20 sharding.batch")
        body.pop(2 + (kind in ("ep", "fsdp_ep")))
        if kind == "ddp":
            assert body[2:4] == [
                "    dp_mesh = mesh['dp']  # replicate over dp",
                f"    replicate(model, device_mesh=dp_mesh)  # DDP: gradients all-reduced, averaged  # {where}:20 sharding.batch",
            ]
        elif kind == "ep":
            assert body[3:6] == [
                f"    ep_mesh = mesh['ep']  # expert parallelism: routed rows travel by all-to-all  # {where}:20 sharding.experts",
                "    for experts in expert_modules(model):",
                "        shard_experts(experts, ep_mesh)  # this rank keeps its experts of EXPERT_PLACEMENT",
            ]
            assert "EXPERT_PLACEMENT = {0: (0, 1), 1: (2, 3)}  # ep rank -> its experts, contiguous" in program.parallel_source
            assert ("dispatch_experts(x, chosen, weights, self.experts.w_gate_up, self.experts.w_down, 'silu')"
                    in program.source)
        elif kind == "fsdp_ep":  # experts over ep, then FSDP over fsdp; everything else FSDP over fsdp x ep
            assert body[6:16] == [
                f"    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)  # {where}:21 schedule.precision",
                "    dp_mesh = mesh[('fsdp', 'ep')]._flatten('fsdp_ep')  # FSDP: shard over fsdp x ep",
                "    expert_mesh = mesh['fsdp']  # experts: FSDP over fsdp, sharded over ep already",
                "    for experts in expert_modules(model):",
                "        fully_shard(experts, mesh=expert_mesh, mp_policy=policy, reshard_after_forward=False)",
                "    gather_experts_around(model.blocks[0], model.blocks[0].moe.experts)",
                "    gather_experts_around(model.blocks[1], model.blocks[1].moe.experts)",
                "    for block in model.blocks:  # blocks.0 .. blocks.1, one unit each",
                f"        fully_shard(block, mesh=dp_mesh, mp_policy=policy)  # {where}:20 sharding.fsdp",
                "    fully_shard(model, mesh=dp_mesh, mp_policy=policy)  # the root: embeddings, final norm, head",
            ]
            assert program.parallel_source.endswith("            param.grad.to_local().div_(2)  # ep\n")
        else:  # the spec has no precision key: the comment points at its parent, schedule
            assert body[2:7] == [
                f"    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)  # {where}:21 schedule.precision",
                "    dp_mesh = mesh['fsdp']  # FSDP: shard over fsdp",
                "    for block in model.blocks:  # blocks.0 .. blocks.1, one unit each",
                f"        fully_shard(block, mesh=dp_mesh, mp_policy=policy)  # {where}:20 sharding.fsdp",
                "    fully_shard(model, mesh=dp_mesh, mp_policy=policy)  # the root: embeddings, final norm, head",
            ]


@pytest.mark.slow
def test_activation_checkpointing_under_fsdp_gives_the_single_process_losses(single, tmp_path):
    """Selective checkpointing inside FSDP2's units: the recomputed forward finds its parameters gathered."""
    text = spec_text(MESHES["fsdp"]).replace("schedule:\n", "schedule:\n  activation_checkpointing: {mode: selective}\n")
    assert train_losses(run_processes(tmp_path, "fsdp", text)) == pytest.approx(train_losses(single), rel=1e-5)


def mtp_rows(run_dir: Path) -> list[tuple]:
    return [(r["loss"], r["mtp_loss_1"], r["mtp_loss_2"], r["grad_norm"]) for r in read_metrics(run_dir / "metrics.jsonl")
            if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp", "fsdp_ep"])
def test_multi_token_prediction_under_fsdp_gives_the_single_process_losses(kind, tmp_path):
    """head.mtp (depth 2): the MTP modules are sharded with the root; losses per depth and gradient norms as on one process.
    fsdp_ep (deepseek_v3_671b.yaml's layout): the MTP blocks' experts split over ep and FSDP-sharded over fsdp, gathered
    around their block as the model's are."""
    text = spec_text(MESHES[kind]).replace("head: {kind: lm}", "head: {kind: lm, mtp: {depth: 2, weight: 0.3}}")
    single = tmp_path / "single"
    Trainer(moec.load_spec_text(text.replace(MESHES[kind], ""), file="single.yaml"), run_dir=single).run()
    expected, got = mtp_rows(single), mtp_rows(run_processes(tmp_path, kind, text))
    assert len(got) == 5 and [v for row in got for v in row] == pytest.approx([v for row in expected for v in row], rel=1e-5)
