"""A 2-process FSDP2 run with asynchronous checkpoints and a profile: one trace per rank, and its
checkpoint (written in the background on a gloo group of its own) resumes on 1 process."""

import gzip
import json
import sys

import pytest

import moec
from moec.backends.torch.phases import MOE_PHASES
from moec.checkpoint import dcp as ckpt
from moec.train.trainer import Trainer
from tests.conftest import REPO
from tests.distributed.processes import run_job
from tests.distributed.test_parallel_training import MESHES, single, spec_text, train_losses  # noqa: F401 - single is a fixture

ASYNC = "keep_last: 2, async: true}"


@pytest.mark.slow
def test_fsdp2_async_checkpoints_resume_on_one_process_and_each_rank_writes_a_trace(single, tmp_path):
    text = spec_text(MESHES["fsdp"]).replace("keep_last: 2}", ASYNC)
    spec_path = tmp_path / "fsdp_async.yaml"
    spec_path.write_text(text)
    done = run_job([sys.executable, "-m", "moec.cli.main", "train", str(spec_path), "--nproc", "2", "--run-dir", str(tmp_path / "run"),
                    "--no-plots", "--profile", "2:3"], timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = train_losses(single)
    assert train_losses(tmp_path / "run") == pytest.approx(expected, rel=1e-5)
    for rank in (0, 1):
        with gzip.open(tmp_path / "run" / "profile" / f"rank{rank}.pt.trace.json.gz", "rt") as handle:
            names = {event.get("name") for event in json.load(handle)["traceEvents"]}
        assert {"moe.router", "moe.experts", "moe.combine"} <= names & set(MOE_PHASES)
    assert [info.step for info in ckpt.list_checkpoints(tmp_path / "run")] == [3, 5]
    (tmp_path / "run" / "checkpoints" / "step_00000005").rename(tmp_path / "later")  # resume from step 3, on 1 process
    spec = moec.load_spec_text(spec_text().replace("keep_last: 2}", ASYNC), file="single.yaml")
    Trainer(spec, run_dir=tmp_path / "run", resume="latest", allow_spec_change=True).run()
    assert train_losses(tmp_path / "run") == pytest.approx(expected, rel=1e-5)
