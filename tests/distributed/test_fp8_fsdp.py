"""compute: fp8 under FSDP2 on 2 CPU processes (gloo, torchao's emulation): the projections are converted before
fully_shard (torchtitan's order), the FSDP units gather bf16 weights (MixedPrecisionPolicy) and each Float8Linear casts
them. Rowwise scales of the weight gradient's operands run over each rank's tokens, so 2 ranks are not bitwise one
process: the losses agree within 0.2% (measured: 1e-4 relative, 5 steps)."""

import pytest

import moec
from moec.train.trainer import Trainer
from tests.distributed.test_parallel_training import MESHES, run_processes, spec_text, train_losses

pytest.importorskip("torchao")


def fp8_text(mesh: str = "") -> str:
    return spec_text(mesh).replace("schedule:\n", "schedule:\n  precision: {compute: fp8}\n")


@pytest.mark.slow
def test_fp8_under_fsdp_gives_the_single_process_losses(tmp_path):
    single = tmp_path / "single"
    Trainer(moec.load_spec_text(fp8_text(), file="single.yaml"), run_dir=single).run()
    sharded = run_processes(tmp_path / "fsdp", "fsdp", fp8_text(MESHES["fsdp"]))
    expected, got = train_losses(single), train_losses(sharded)
    assert len(got) == 5 and got == pytest.approx(expected, rel=2e-3)
