"""Context parallelism (``sharding.sequence``) on 2 and 4 CPU processes (gloo) against one process.

Each rank holds chunks r and 2cp-1-r of every sequence; attention gathers the keys and values of
the whole sequence; the MoE layers sum their expert counts over the cp ranks. A token model with
GQA attention and MoE layers must train as one process does: the same losses, gradient norms and
validation losses over 5 steps, also with the experts split over a batch axis (cp 2 x ep 2) or over
the cp axis itself (its ranks are data ranks for expert parallelism).
"""

from pathlib import Path

import pytest
import torch

import moec
from moec.backends.torch.context_parallel import load_balanced_positions
from moec.distributed.processes import DistContext, local_slice
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.distributed.processes import train_on_processes
from tests.runtime.helpers import quick_text

MESHES = {
    "cp2": ("mesh: {world_size: 2, axes: {cp: 2}}\nsharding: {sequence: [cp]}\n", 2),
    "cp4": ("mesh: {world_size: 4, axes: {cp: 4}}\nsharding: {sequence: [cp]}\n", 4),
    # dp 2 x cp 2 (the flattened (dp, cp) data mesh) with FSDP2; plain DDP over cp ranks is cp2's
    "fsdp2_cp2": ("mesh: {world_size: 4, axes: {dp: 2, cp: 2}}\nsharding: {batch: [dp], fsdp: [dp], sequence: [cp]}\n", 4),
    # expert parallelism over a batch axis, and over the cp axis itself (its ranks hold other tokens: data ranks for it)
    "cp2_ep2": ("mesh: {world_size: 4, axes: {ep: 2, cp: 2}}\nsharding: {batch: [ep], experts: [ep], sequence: [cp]}\n", 4),
    "cp2_experts_over_cp": ("mesh: {world_size: 2, axes: {cp: 2}}\nsharding: {experts: [cp], sequence: [cp]}\n", 2),
}
DP2_CP2 = "mesh: {world_size: 4, axes: {dp: 2, cp: 2}}\nsharding: {batch: [dp], sequence: [cp]}\n"  # the program text test's
GLOBAL_BALANCE = ("fsdp2_cp2", "cp2_ep2")  # dp ranks differ from one process unless the counts span the batch


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
    spec = moec.load_spec_text(spec_text(DP2_CP2), file="cp.yaml")
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
    return train_on_processes(spec, nproc, tmp_path / "run")


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


# --- the attention alone: 2 gloo processes against attention over the whole sequence ---------------------------------

HEADS, KV_HEADS, HEAD_DIM, SEQ = 4, 2, 8, 16
CASES = {"causal": (True, None), "window 5": (True, 5), "not causal": (False, None)}


def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, SEQ, heads * HEAD_DIM, generator=generator) for heads in (HEADS, KV_HEADS, KV_HEADS))


def whole_attention(causal: bool, window: int | None) -> list[torch.Tensor]:
    """The output and the q, k, v gradients of one process's attention over the whole sequence."""
    from moec.backends.torch.snippets import attention, attention_local

    q, k, v = (t.clone().requires_grad_() for t in qkv())
    if window is not None:
        out = attention_local(q, k, v, HEADS, KV_HEADS, HEAD_DIM, window, None)
    else:
        out = attention(q, k, v, HEADS, KV_HEADS, HEAD_DIM, causal)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.detach(), q.grad, k.grad, v.grad]


def attention_worker(rank: int, port: int, results) -> None:
    import os

    import torch.distributed as dist

    from moec.backends.torch.context_parallel import SequenceShards, context_attention

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        shards, mine = SequenceShards(dist.group.WORLD), load_balanced_positions(SEQ // 2, rank, 2)
        weights = torch.linspace(-1, 1, 2 * SEQ * HEADS * HEAD_DIM).view(2, SEQ, -1)[:, mine]
        for name, (causal, window) in CASES.items():
            q, k, v = (t[:, mine].clone().requires_grad_() for t in qkv())
            out = context_attention(q, k, v, HEADS, KV_HEADS, HEAD_DIM, causal, window, shards)
            (out * weights).sum().backward()  # this rank's share of the whole sequence's sum
            parts = [torch.cat(gathered, 1) for gathered in zip(*[
                [p.contiguous() for p in pieces] for pieces in _all_gathered([out.detach(), q.grad, k.grad, v.grad])])]
            if rank == 0:
                order = torch.cat([load_balanced_positions(SEQ // 2, r, 2) for r in range(2)]).argsort()
                results[name] = [part[:, order] for part in parts]
    finally:
        dist.destroy_process_group()


def _all_gathered(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per rank, its ``tensors`` (gathered from the group)."""
    import torch.distributed as dist

    per_rank = [[torch.empty_like(t) for t in tensors] for _ in range(dist.get_world_size())]
    for i, tensor in enumerate(tensors):
        gathered = [torch.empty_like(tensor) for _ in per_rank]
        dist.all_gather(gathered, tensor.contiguous())
        for rank, value in enumerate(gathered):
            per_rank[rank][i] = value
    return per_rank


@pytest.mark.slow
def test_context_attention_gives_whole_sequence_outputs_and_gradients():
    """Causal, sliding-window and non-causal attention over 2 ranks' load-balanced chunks: outputs and the q, k, v
    gradients (k and v through the all-gather's backward) equal one process's over the whole sequence."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(attention_worker, args=(port, results), nprocs=2, start_method="spawn", join=True)
        results = dict(results)
    for name, (causal, window) in CASES.items():
        for what, got, expected in zip(("output", "q grad", "k grad", "v grad"), results[name], whole_attention(causal, window)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=f"{name} {what}")
