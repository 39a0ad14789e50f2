"""Tensor parallelism (``sharding.tensor``) on 2 and 4 CPU processes (gloo) against one process.

The spec (tp_worker.SPEC) has GQA attention (4 heads, 2 KV heads: one per tp rank), a top-2-of-4
MoE with load-balance and z losses, and a SwiGLU MLP, so every split group runs: attention.qkv /
attention.out, experts.up / experts.down (the expert hidden size) and mlp.up / mlp.down. The
load-balance loss counts tokens over the global batch, so tp x dp is the one-process run too.
With 1 KV head (``kv_heads=1``) both tp ranks replicate it: wk and wv stay whole, read through
parallel.py's ``ReplicatedKvHead``.
"""

import json
import sys
from pathlib import Path

import pytest

import moec
from moec.compile import compile_spec
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.conftest import REPO
from tests.distributed.processes import run_job
from tests.distributed.tp_worker import TP2, TP2_VOCAB, VOCAB, dense_text, spec_text

TP2_DP2 = "mesh: {world_size: 4, axes: {dp: 2, tp: 2}}\nsharding:\n  batch: [dp]\n  tensor: {axis: tp}\n"
TP2_FSDP2 = "mesh: {world_size: 4, axes: {fsdp: 2, tp: 2}}\nsharding:\n  batch: [fsdp]\n  fsdp: [fsdp]\n  tensor: {axis: tp}\n"
# Megatron's expert layout: the 4 experts over ep (2 per rank), each expert's hidden size over tp (16 of 32 per rank)
TP2_EP2 = "mesh: {world_size: 4, axes: {ep: 2, tp: 2}}\nsharding:\n  batch: [ep]\n  experts: [ep]\n  tensor: {axis: tp}\n"


def rows(run_dir: Path, kind: str, key: str) -> list[float]:
    return [row[key] for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == kind]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    Trainer(moec.load_spec_text(spec_text(), file="single.yaml"), run_dir=run_dir).run()
    return run_dir


def train_processes(tmp_path: Path, mesh: str, nproc: int, text=spec_text) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = tmp_path / "tp.yaml"
    spec.write_text(text(mesh))
    moec_script = Path(sys.executable).parent / "moec"
    done = run_job([str(moec_script), "train", str(spec), "--nproc", str(nproc), "--run-dir", str(tmp_path / "run"), "--no-plots"],
                   timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "run"


def assert_same_run(run_dir: Path, single: Path) -> None:
    for kind, key in (("train", "loss"), ("train", "grad_norm"), ("eval", "val_loss")):
        got, expected = rows(run_dir, kind, key), rows(single, kind, key)
        assert len(got) == len(expected) > 0 and got == pytest.approx(expected, rel=1e-5), (key, got, expected)
    plan = next(r["memory_plan"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train")
    assert plan["held_over_planned"] == pytest.approx(1.0, abs=0.02), plan
    print(f"memory plan: held {plan['held']['total_bytes']} B, planned {plan['planned']['total_bytes']} B per rank")


def test_tp2_forward_aux_and_gradients_equal_one_process(tmp_path):
    out = tmp_path / "diffs.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tests.distributed.tp_worker", str(out)]
    done = run_job(command, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    for kv_heads, split in ((2, 18), (1, 14)):  # 1 KV head for 2 ranks: wk and wv stay whole on both
        diffs = results[f"kv_heads_{kv_heads}"]
        assert diffs["weights"] == 0.0  # the shards are slices of the one-process initialisation
        assert diffs["output"] < 1e-5 and diffs["aux_loss"] < 1e-5, diffs
        assert max(diffs["grads"].values()) < 1e-5, diffs["grads"]  # relative to each gradient's largest entry
        assert len(diffs["grads"]) == 29  # every parameter, split or whole (gate and up: one w_gate_up per MoE layer)
        shapes = diffs["local_shapes"]  # heads 4 -> 2 per rank, expert hidden 32 -> 16, mlp hidden 64 -> 32
        assert (shapes["blocks.0.attention.wq.weight"], shapes["blocks.0.attention.wo.weight"]) == ([16, 32], [32, 16])
        # each rank: its 16 rows of the gate half and the same 16 of the up half
        assert (shapes["blocks.1.moe.experts.w_gate_up"], shapes["blocks.1.moe.experts.w_down"]) == ([4, 2, 16, 32], [4, 32, 16])
        assert (shapes["blocks.0.mlp.w_up.weight"], shapes["blocks.0.mlp.w_down.weight"]) == ([32, 32], [32, 32])
        assert len(diffs["split"]) == split and not any("norm" in name or "router" in name for name in diffs["split"])
    assert results["kv_heads_2"]["local_shapes"]["blocks.0.attention.wk.weight"] == [8, 32]  # kv heads 2 -> 1 per rank
    assert not any(name.endswith((".wk.weight", ".wv.weight")) for name in results["kv_heads_1"]["split"])
    assert results["compiled_kv_head"] < 1e-6  # torch.compile(fullgraph=True) traces ReplicatedKvHead and its backward
    for layout, params, split in (("vocab", 29, 20), ("tied", 28, 19)):  # the vocabulary split, the logits too
        diffs = results[layout]
        assert diffs["weights"] == 0.0 and diffs["output"] < 1e-5 and diffs["aux_loss"] < 1e-5, (layout, diffs)
        assert len(diffs["grads"]) == params and max(diffs["grads"].values()) < 1e-5, (layout, diffs["grads"])
        assert len(diffs["split"]) == split and diffs["local_shapes"]["embed.weight"] == [128, 32]
    assert results["vocab"]["local_shapes"]["head.weight"] == [128, 32] and "head.weight" not in results["tied"]["split"]


def compiled(text: str) -> str:
    assert "compile: {enabled: false}" in text
    return text.replace("compile: {enabled: false}", "compile: {fullgraph: true}")


@pytest.mark.slow
def test_tp2_vocab_parallel_compiled_trains_like_one_process_and_its_checkpoint_resumes_on_one(single, tmp_path):
    """The vocabulary split too (embed, head: vocab-parallel loss), and the blocks compiled: the eager root's
    collectives feed compiled graphs forward (the embedding's sum) and backward (the head's f)."""
    run_dir = train_processes(tmp_path, TP2_VOCAB, 2, lambda mesh: compiled(spec_text(mesh)))
    assert_same_run(run_dir, single)
    resumed = tmp_path / "resumed"  # the step-3 checkpoint of DTensor shards (the vocabulary's too), on one process
    (run_dir / "checkpoints" / "step_00000005").rename(tmp_path / "later")
    run_dir.rename(resumed)
    Trainer(moec.load_spec_text(spec_text(), file="single.yaml"), run_dir=resumed, resume="latest", allow_spec_change=True).run()
    assert rows(resumed, "train", "loss") == pytest.approx(rows(single, "train", "loss"), rel=1e-5)


@pytest.fixture(scope="module")
def single_kv1(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single_kv1")
    Trainer(moec.load_spec_text(spec_text(kv_heads=1), file="single.yaml"), run_dir=run_dir).run()
    return run_dir


@pytest.mark.slow
def test_tp2_with_data_parallel_trains_like_one_process(single, tmp_path):
    assert_same_run(train_processes(tmp_path, TP2_DP2, 4), single)


@pytest.mark.slow
def test_tp2_fsdp2_with_a_replicated_kv_head_trains_like_one_process(single_kv1, tmp_path):
    """1 KV head for 2 tp ranks: wk and wv whole on both (FSDP-sharded over fsdp), their gradients
    summed over tp by kv_shard's backward; the memory plan counts them whole."""
    assert_same_run(train_processes(tmp_path, TP2_FSDP2, 4, lambda mesh: spec_text(mesh, kv_heads=1)), single_kv1)


@pytest.fixture(scope="module")
def single_dense(tmp_path_factory):
    """The one-process run of the dense spec with a given number of KV heads (each trained once)."""
    runs = {}

    def run(kv_heads: int) -> Path:
        if kv_heads not in runs:
            runs[kv_heads] = tmp_path_factory.mktemp(f"single_dense_kv{kv_heads}")
            Trainer(moec.load_spec_text(dense_text(kv_heads=kv_heads), file="single.yaml"), run_dir=runs[kv_heads]).run()
        return runs[kv_heads]
    return run


SP = "    sequence_parallel: true\n"


@pytest.mark.slow
@pytest.mark.parametrize(("mesh", "kv_heads"), [(TP2_VOCAB.replace(VOCAB, VOCAB + SP), 2), (TP2_DP2.replace(
    "  tensor: {axis: tp}\n", "  tensor:\n    axis: tp\n" + SP), 1)], ids=["tp2_sp_vocab", "tp2_dp2_sp_replicated_kv"])
def test_sequence_parallel_trains_like_one_process(mesh, kv_heads, single_dense, tmp_path):
    """kv_heads 1: kv_shard leaves wk's and wv's gradients partial, reduce_gradients sums them over tp."""
    nproc = 2 if mesh.startswith("mesh: {world_size: 2") else 4
    run_dir = train_processes(tmp_path, mesh, nproc, lambda mesh: dense_text(mesh, kv_heads))
    assert_same_run(run_dir, single_dense(kv_heads))


def test_sequence_parallel_lines(tmp_path):
    """Megatron-SP through torch's plans: the norms on S / tp positions (SequenceParallel), each layer's input
    gathered (PrepareModuleInput), the row splits reduce-scattered (RowwiseParallel to Shard(1)), the hidden state
    split at the first block and gathered after the last; model.py is the one-process program."""
    mesh = TP2.replace("  tensor: {axis: tp}\n", "  tensor:\n    axis: tp\n" + SP)
    program = compile_spec(moec.load_spec_text(dense_text(mesh), file="sp.yaml"))
    plain = compile_spec(moec.load_spec_text(dense_text(TP2), file="sp.yaml"))
    assert program.source.split("SPEC_NAME")[1] == plain.source.split("SPEC_NAME")[1]
    strip = [line.split("  # ")[0] for line in program.parallel_source.splitlines()]
    start = strip.index("    for block in model.blocks:")
    assert strip[start:start + 17] == [
        "    for block in model.blocks:",
        "        parallelize_module(block, tp_mesh, {",
        "            'attention_norm': SequenceParallel(use_local_output=True),",
        ("            'attention': PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None), "
         "use_local_output=True),"),
        "            'attention.wq': ColwiseParallel(),",
        "            'attention.wk': ColwiseParallel(),",
        "            'attention.wv': ColwiseParallel(),",
        "            'attention.wo': RowwiseParallel(output_layouts=Shard(1)),",
        "            'mlp_norm': SequenceParallel(use_local_output=True),",
        "            'mlp': PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True),",
        "            'mlp.w_up': ColwiseParallel(),",
        "            'mlp.w_gate': ColwiseParallel(),",
        "            'mlp.w_down': RowwiseParallel(output_layouts=Shard(1)),",
        "        })",
        "  ",  # the comment: the blocks run on S / tp positions, the final norm and head on all of them
        ("    parallelize_module(model.blocks[0], tp_mesh, PrepareModuleInput(input_layouts=(Replicate(),), "
         "desired_input_layouts=(Shard(1),), use_local_output=True))"),
        ("    parallelize_module(model.blocks[-1], tp_mesh, PrepareModuleOutput(output_layouts=Shard(1), "
         "desired_output_layouts=Replicate()))"),
    ]
    assert "    match_gradient_placements(model)" in strip  # the norms' gradients are partial sums over tp


def test_parallel_py_splits_the_groups_with_spec_lines(tmp_path):
    path = tmp_path / "tp2.yaml"
    path.write_text(spec_text(TP2))
    program = compile_spec(moec.load_spec(path))
    lines = program.parallel_source.split("def tensor_parallel")[1].splitlines()
    assert lines[4:18] == [
        f"    tp_mesh = mesh['tp']  # {path}:25 sharding.tensor.axis",
        "    for block in model.blocks:",
        "        parallelize_module(block, tp_mesh, {",
        f"            'attention.wq': ColwiseParallel(),  # attention.qkv column  {path}:25 sharding.tensor.column",
        "            'attention.wk': ColwiseParallel(),",
        "            'attention.wv': ColwiseParallel(),",
        f"            'attention.wo': RowwiseParallel(),  # attention.out row  {path}:25 sharding.tensor.row",
        ("            'moe.experts': ExpertHiddenSplit({'w_gate_up': 2, 'w_down': 2}),  # experts.up column, "
         f"experts.down row  {path}:25 sharding.tensor.column"),
        f"            'mlp.w_up': ColwiseParallel(),  # mlp.up column  {path}:25 sharding.tensor.column",
        "            'mlp.w_gate': ColwiseParallel(),",
        f"            'mlp.w_down': RowwiseParallel(),  # mlp.down row  {path}:25 sharding.tensor.row",
        "        })",
        "",
        "",
    ]
    assert "\nfrom model_support import ExpertHiddenSplit  # this build's helpers\n" in program.parallel_source
    assert "    tensor_parallel(model, mesh)\n" in program.parallel_source.split("def parallelize")[1]
    assert "UNSUPPORTED = ()" in program.parallel_source
    imports = [line for line in program.parallel_source.splitlines() if line.startswith(("import ", "from "))]
    assert not any("moec" in line.split("#")[0] for line in imports), imports  # torch and the build's own model_support only


@pytest.mark.slow
def test_tp2_x_ep2_trains_like_one_process_and_its_checkpoint_resumes_on_one(single, tmp_path):
    run_dir = train_processes(tmp_path, TP2_EP2, 4)
    assert_same_run(run_dir, single)
    first = next(r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train")
    assert first["expert_parallel_bytes_sent"] > 0  # routed rows travelled over the ep group
    # each rank holds a quarter of the experts' bytes (half the experts, half of each one's hidden size), tp 2 alone half:
    # 2 layers x 4 experts x (up, gate, down) 32 x 32, fp32, each 4 times (weight, gradient, AdamW's two moments)
    experts = 2 * 4 * 3 * 32 * 32 * 4 * 4
    tp2 = compile_spec(moec.load_spec_text(spec_text(TP2), file="tp2.yaml")).manifest["memory_per_device"]["total_bytes"]
    plan = first["memory_plan"]
    assert plan["held"]["total_bytes"] == plan["planned"]["total_bytes"] == tp2 - experts // 4, plan
    resumed = tmp_path / "resumed"  # the step-3 checkpoint of 2-D (ep, tp) expert shards, on one process
    (run_dir / "checkpoints" / "step_00000005").rename(tmp_path / "later")
    run_dir.rename(resumed)
    Trainer(moec.load_spec_text(spec_text(), file="single.yaml"), run_dir=resumed, resume="latest", allow_spec_change=True).run()
    assert rows(resumed, "train", "loss") == pytest.approx(rows(single, "train", "loss"), rel=1e-5)


def test_tp_x_ep_lines(tmp_path):
    """model.py's MoE under tp x ep: f before the tokens travel, the all-to-all over ep with the DTensor weights
    (dispatch_experts applies g to the experts' outputs before the router's weights combine them)."""
    program = compile_spec(moec.load_spec_text(spec_text(TP2_EP2), file="tp_ep.yaml"))
    strip = [line.split("  # ")[0] for line in program.source.splitlines()]
    assert ("        out = dispatch_experts(copy_to_shards(x, self.experts.w_gate_up), chosen, weights, self.experts.w_gate_up, "
            "self.experts.w_down, 'silu')") in strip
    assert "local(self.experts" not in program.source  # dispatch_experts reads the DTensors' meshes itself
    parallel = program.parallel_source
    assert "        sharded = distribute_tensor(param.detach(), expert_mesh, [Shard(0), Shard(EXPERT_TP_SPLITS[name])])" in parallel
    assert "ExpertHiddenSplit" not in parallel  # shard_experts splits them over ep and tp at once
    # a mesh listing tp first: the placements follow the mesh's order (a DeviceMesh slice keeps it)
    flipped = TP2_EP2.replace("axes: {ep: 2, tp: 2}", "axes: {tp: 2, ep: 2}")
    parallel = compile_spec(moec.load_spec_text(spec_text(flipped), file="tp_ep.yaml")).parallel_source
    assert "        sharded = distribute_tensor(param.detach(), expert_mesh, [Shard(EXPERT_TP_SPLITS[name]), Shard(0)])" in parallel
    assert "    ep_mesh = mesh[('tp', 'ep')]" in parallel
