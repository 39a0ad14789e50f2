"""No code runs from a checkpoint; user strings never reach rich as markup."""

import os
import pickle
import re
import warnings

import pytest
from torch.distributed.checkpoint.filesystem import FileSystemReader

from moec.checkpoint import dcp as ckpt
from moec.observe.metrics import read_metrics
from tests.hostile.helpers import copy_run, moec_cli, reseal, tree_digest, write_spec


class _Payload:
    """Unpickling this runs ``touch MARKER``: what an attacker would put in ``.metadata``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _poison(checkpoint, marker):
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    reseal(checkpoint)  # the manifest has no secret: a forger rewrites it too, so the unpickler must hold


def test_torchs_own_reader_runs_the_payload(finished_run, tmp_path):
    # The threat is real: DCP's FileSystemReader pickle.loads .metadata.
    _, run_dir = finished_run
    checkpoint = copy_run(run_dir, tmp_path / "run") / "checkpoints" / "step_00000004"
    marker = tmp_path / "pwned"
    _poison(checkpoint, marker)
    try:
        FileSystemReader(str(checkpoint)).read_metadata()
    except Exception:  # noqa: BLE001 - os.system returns an int, which torch then trips over
        pass
    assert marker.exists()


def test_a_malicious_metadata_pickle_runs_nothing_and_is_refused_in_one_line(finished_run, tmp_path):
    spec_path, run_dir = finished_run
    run = copy_run(run_dir, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step_00000004"
    marker = tmp_path / "pwned"
    _poison(checkpoint, marker)
    before = tree_digest(run)
    result = moec_cli("train", spec_path, "--run-dir", run, "--resume", "--no-plots")
    assert result.exit_code == 1
    assert result.stderr == (f"error: cannot resume: {checkpoint}/.metadata: not a DCP metadata file "
                             "(UnpicklingError: refusing to load posix.system); --resume-from latest-valid resumes from the "
                             "newest checkpoint that verifies\n")
    assert not marker.exists() and "Traceback" not in result.output
    assert tree_digest(run) == before  # the refusal changed nothing, metrics.jsonl included
    with pytest.raises(ckpt.CheckpointError, match="refusing to load posix.system"):
        ckpt.read_dcp_metadata(checkpoint / ".metadata")
    assert not marker.exists()


def test_the_restricted_unpickler_still_reads_real_dcp_metadata(finished_run):
    _, run_dir = finished_run
    metadata = ckpt.read_dcp_metadata(run_dir / "checkpoints" / "step_00000004" / ".metadata")
    assert "model.embed.weight" in metadata.state_dict_metadata
    assert metadata.state_dict_metadata["model.embed.weight"].size == (256, 32)


@pytest.mark.parametrize("payload, refused", [
    (b"cos\nsystem\n(S'true'\ntR.", "refusing to load os.system"),  # protocol 0 GLOBAL + REDUCE
    (b"cbuiltins\neval\n(S'1'\ntR.", "refusing to load builtins.eval"),
    (pickle.dumps({"not": "metadata"}), "it holds a dict"),
    (b"", "EOFError: Ran out of input"),
])
def test_other_hostile_pickles_are_refused(tmp_path, payload, refused):
    (tmp_path / ".metadata").write_bytes(payload)
    with pytest.raises(ckpt.CheckpointError, match=refused):
        ckpt.read_dcp_metadata(tmp_path / ".metadata")


def test_rich_markup_in_the_name_and_run_directory_is_printed_literally(tmp_path):
    spec_path = write_spec(tmp_path, steps=2, every=2)
    spec_path.write_text(spec_path.read_text().replace("name: quick", 'name: "[/bad]"'))
    run_dir = tmp_path / "runs" / "[/x]"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = moec_cli("train", spec_path, "--run-dir", run_dir, "--no-plots")
    assert result.exit_code == 0, result.output
    # rich prints the time before a log line when the second changed since the last one
    lines = [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", line.strip()) for line in result.stdout.splitlines()]
    assert "moec train [/bad]" in lines
    assert f"checkpoint {run_dir}/checkpoints/step_00000002" in lines
    assert any(re.fullmatch(rf"│ run directory +│ {re.escape(str(run_dir))} +│", line) for line in lines)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"] == [1, 2]
    result = moec_cli("train", spec_path, "--run-dir", run_dir, "--no-plots", "--resume", "--allow-spec-change")
    assert result.exit_code == 0 and "Traceback" not in result.output


def test_rich_markup_in_checkpoint_dir_from_the_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec_path = write_spec(tmp_path, steps=2, every=2)
    spec_path.write_text(spec_path.read_text().replace("keep_last: 2}", 'keep_last: 2, dir: "runs/[/x]"}'))
    result = moec_cli("train", spec_path, "--no-plots")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "[/x]" / "checkpoints" / "step_00000002" / ckpt.MANIFEST).is_file()
