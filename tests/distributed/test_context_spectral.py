"""The spectral MoE with the sequence split over a context-parallel group (the distributed rfft), on 2 and 4 CPU
processes (gloo) against one process.

Each rank holds chunks r and 2cp-1-r of the sequence; the layer exchanges to the whole sequence of d_model / cp
channels, transforms, exchanges to its share of the S/2+1 bins (unequal: 17 bins over 2 or 4 ranks), routes them,
and goes back. Its output, its aux loss (averaged over the ranks, as the gradients are) and every gradient must
be one process's, for the band embedding with the DFT kernel and the band index feature with torch.fft. A model
of attention and spectral MoE layers (head.pool 'last': cp rank 0 holds the last position) trains 5 steps as one
process does, also with its experts split over a batch axis (cp 2 x ep 2).
"""

import os
import socket
from pathlib import Path

import pytest
import torch

import moec
from moec.backends.torch.context_parallel import load_balanced_positions
from moec.ir.printer import print_graph
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.conftest import REPO
from tests.distributed.processes import train_on_processes

BATCH, SEQ, WIDTH = 2, 32, 16
VARIANTS = {"band embedding, dft": ("embedding", "auto"), "band index, fft": ("index_feature", "fft")}

SPEC = """version: 1
name: spectral_cp
model:
  d_model: 16
  max_seq_len: 64
  inputs: {{kind: tokens, vocab: 256}}
  blocks:
    - repeat: 2
      layers:
        - kind: attention
          heads: 2
        - kind: spectral_moe
          depth: 2
          band: {band}
          moe:
            experts: 4
            top_k: 2
            expert: {{hidden: 32, activation: swiglu}}
            aux: {{load_balance: 0.01, z_loss: 0.001, load_balance_batch: global}}
        - kind: mlp
          hidden: 32
  head: {{kind: lm, pool: last}}
{mesh}schedule:
  compile: {{enabled: false}}
  deterministic: true
  kernels: {{spectral_moe: {kernel}}}
train:
  seed: 0
  steps: 5
  batch: 4
  seq_len: 32
  optimizer: {{lr: 3.0e-3}}
  lr_schedule: {{warmup_steps: 2}}
  data: {{kind: text, files: ["stdlib:json/*.py"]}}
  eval: {{every: 5, batches: 2}}
"""


# cp 2 x ep 2 of the spectral MoE is the bundled spec's layout: test_the_bundled_spec_trains_on_4_processes_as_on_one
MESHES = {  # the expert counts summed over every rank holding the batch's tokens (load_balance_batch global)
    "cp2": ("mesh: {world_size: 2, axes: {cp: 2}}\nsharding: {sequence: [cp]}\n", 2),
    "cp4": ("mesh: {world_size: 4, axes: {cp: 4}}\nsharding: {sequence: [cp]}\n", 4),
}


def spec_text(band: str = "embedding", kernel: str = "auto", cp: int = 1, mesh: str | None = None) -> str:
    if mesh is None:
        mesh = f"mesh: {{world_size: {cp}, axes: {{cp: {cp}}}}}\nsharding: {{sequence: [cp]}}\n" if cp > 1 else ""
    return SPEC.format(band=band, kernel=kernel, mesh=mesh)


def layer_of(band: str, kernel: str, cp: int):
    """Block 0's spectral MoE layer, its weights from the spec's seed (the same on every process)."""
    model = moec.build_model(moec.load_spec_text(spec_text(band, kernel, cp), file="cp.yaml"))
    return model.blocks[0].spectral_moe.train()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, SEQ, WIDTH, generator=generator), torch.randn(BATCH, SEQ, WIDTH, generator=generator)


def one_process(band: str, kernel: str, cp: int) -> dict:
    """Output, aux and gradients of the whole sequence; the loss counts the aux cp times, as the ranks' sum does."""
    layer = layer_of(band, kernel, cp)
    x, weight = inputs()
    x.requires_grad_()
    out, aux, _ = layer(x)
    ((out * weight).sum() + cp * aux).backward()
    return {"output": out.detach(), "aux": aux.detach(), "x grad": x.grad,
            **{name: p.grad for name, p in layer.named_parameters()}}


def spectral_worker(rank: int, cp: int, port: int, results) -> None:
    import torch.distributed as dist

    from moec.backends.torch.context_parallel import SequenceShards

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=cp)
    try:
        mine = load_balanced_positions(SEQ // cp, rank, cp)
        order = torch.cat([load_balanced_positions(SEQ // cp, r, cp) for r in range(cp)]).argsort()
        for name, (band, kernel) in VARIANTS.items():
            layer = layer_of(band, kernel, cp)
            layer.context, layer.batch_group = SequenceShards(dist.group.WORLD), dist.group.WORLD
            x, weight = inputs()
            x = x[:, mine].clone().requires_grad_()
            out, aux, _ = layer(x)
            ((out * weight[:, mine]).sum() + aux).backward()  # this rank's positions and its share of the aux
            whole = [gathered(t)[:, order] for t in (out.detach(), x.grad)]
            dist.all_reduce(aux := aux.detach(), op=dist.ReduceOp.AVG)
            grads = {p_name: p.grad for p_name, p in layer.named_parameters()}
            for grad in grads.values():
                dist.all_reduce(grad)  # every rank's share of the whole loss's gradient
            if rank == 0:
                results[name] = {"output": whole[0], "aux": aux, "x grad": whole[1], **grads}
    finally:
        dist.destroy_process_group()


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` along dim 1, in rank order."""
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_rank_holds_a_contiguous_share_of_the_bins():
    from moec.backends.torch.context_parallel import SequenceShards

    shards = SequenceShards.__new__(SequenceShards)
    shards.size = 4
    assert shards.bin_sizes(32) == [5, 4, 4, 4]  # 17 bins: the first 17 mod 4 ranks one more
    shards.rank = 1
    assert shards.bins(32) == slice(5, 9)
    assert sum(SequenceShards.bin_share(shards, 32) for shards.rank in range(4)) == pytest.approx(4.0)


def test_the_context_parallel_program_runs_on_one_process():
    """Without parallel.py (generation, evaluation on one process) the layers' context is None: the plain program."""
    model = moec.build_model(moec.load_spec_text(spec_text(cp=2), file="cp.yaml"))
    plain = moec.build_model(moec.load_spec_text(spec_text(), file="one.yaml"))
    plain.load_state_dict(model.state_dict())
    inputs = model.example_inputs(batch=2, seq=32)
    got, expected = model(*inputs), plain(*inputs)
    torch.testing.assert_close(got.output, expected.output, rtol=0, atol=0)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=0, atol=0)


def test_the_program_shows_the_exchanges():
    program = moec.compile_spec(moec.load_spec_text(spec_text(cp=2), file="cp.yaml"))
    assert "z = self.context.to_bins(rfft_real(self.context.to_channels(x), 'ortho', use_dft), seq)" in program.source
    assert "x = self.context.from_channels(irfft_real(self.context.from_bins(z, seq), seq, 'ortho', use_dft))" in program.source
    assert "x = self.context.last_position(h)" in program.source
    ir = print_graph(program.graph)
    assert 'exchange="all_to_all over cp: sequence -> channels, rfft, -> bins; experts; bins -> channels' in ir
    assert ir.count('exchange="all_gather(k, v) over cp"') == 2
    # per sequence of 32, fp32: k and v (16 wide) of 16 positions to the other rank in 2 layers (1024 elements), 4
    # all-to-alls keeping half in 2 spectral layers (2 x 2 x (128 + 136)), the last position (16): 8384 bytes
    traffic = program.manifest["context_parallel"]
    assert traffic["collectives_per_forward"] == {"all_gather": 5, "all_reduce": 4, "all_to_all": 8}
    assert traffic["bytes_sent_per_rank_per_sequence"] == {"forward": 8384, "training": 16768}
    one = moec.compile_spec(moec.load_spec_text(spec_text(), file="one.yaml")).source
    assert "context" not in one
    assert "context_parallel" not in moec.compile_spec(moec.load_spec_text(spec_text(), file="one.yaml")).manifest


@pytest.mark.slow
@pytest.mark.parametrize("cp", [2, 4])
def test_the_distributed_rfft_gives_one_process_outputs_aux_and_gradients(cp):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(spectral_worker, args=(cp, free_port(), results), nprocs=cp, start_method="spawn", join=True)
        results = dict(results)
    for name, (band, kernel) in VARIANTS.items():
        expected = one_process(band, kernel, cp)
        assert results[name].keys() == expected.keys()
        for what, value in expected.items():
            worst = (results[name][what] - value).abs().max().item()
            print(f"cp {cp}, {name}, {what}: max |difference| {worst:.2e}")
            assert worst <= 1e-5, (name, what, worst)


def rows(run_dir: Path, kind: str, key: str) -> list[float]:
    return [row[key] for row in read_metrics(run_dir / "metrics.jsonl") if row["kind"] == kind]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    Trainer(moec.load_spec_text(spec_text(), file="single.yaml"), run_dir=run_dir).run()
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(MESHES))
def test_context_parallel_spectral_training_gives_the_single_process_numbers(kind, single, tmp_path):
    mesh, nproc = MESHES[kind]
    spec = tmp_path / f"{kind}.yaml"
    spec.write_text(spec_text(mesh=mesh))
    train_on_processes(spec, nproc, tmp_path / "run")
    for what, key in (("train", "loss"), ("train", "aux_loss"), ("train", "grad_norm"), ("eval", "val_loss")):
        got, expected = rows(tmp_path / "run", what, key), rows(single, what, key)
        assert len(got) == len(expected) > 0, (key, got, expected)
        worst = max(abs(a - b) for a, b in zip(got, expected))
        print(f"{kind} {key}: max |difference| {worst:.2e} over {len(got)} rows")
        assert worst <= 1e-5, (key, got, expected)


BUNDLED = REPO / "specs" / "spectral_moe_cp.yaml"
SHORT = ["train.steps=5", "train.lr_schedule.warmup_steps=2", "train.eval.every=5", "train.eval.batches=2",
         "train.checkpoint.every=5"]


@pytest.mark.slow
def test_the_bundled_spec_trains_on_4_processes_as_on_one(tmp_path):
    """specs/spectral_moe_cp.yaml (signals, head.pool 'last', cp 2 x ep 2), 5 steps as the README launches it,
    against the same spec without its mesh on one process."""
    text = BUNDLED.read_text()
    one = text[:text.index("mesh:")] + text[text.index("schedule:"):]
    Trainer(moec.load_spec_text(one, file="one.yaml", overrides=SHORT), run_dir=tmp_path / "one").run()
    train_on_processes(BUNDLED, 4, tmp_path / "run", *SHORT)
    for what, key in (("train", "loss"), ("train", "aux_loss"), ("train", "grad_norm"), ("eval", "val_loss")):
        got, expected = rows(tmp_path / "run", what, key), rows(tmp_path / "one", what, key)
        assert len(got) == len(expected) > 0, (key, got, expected)
        worst = max(abs(a - b) for a, b in zip(got, expected))
        print(f"spectral_moe_cp.yaml {key}: max |difference| {worst:.2e} over {len(got)} rows")
        assert worst <= 1e-5, (key, got, expected)
