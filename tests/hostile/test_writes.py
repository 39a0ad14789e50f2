"""Never lose what was written: full disks, torn lines, interrupted rewrites, run directories of their own."""

import contextlib
import errno
import json
import os
from pathlib import Path

import pytest
from torch.distributed.checkpoint import filesystem as dcp_fs

from moec.checkpoint import dcp as ckpt
from moec.observe import metrics
from moec.observe.metrics import MetricsWriter, read_metrics
from moec.train.trainer import Trainer
from tests.hostile.helpers import copy_run, moec_cli, tree_digest, write_spec
from tests.runtime.helpers import quick_text

import moec


def _losses(run):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


class _FullAfter:
    """A file object that takes ``room`` bytes and then fails like a full disk."""

    def __init__(self, handle, room):
        self.handle, self.room = handle, room

    def write(self, data):
        if len(data) > self.room:
            self.handle.write(bytes(data)[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_a_full_disk_during_a_checkpoint_save_is_a_clean_stop_and_resumable(finished_run, tmp_path, monkeypatch):
    spec_path, finished = finished_run
    run = tmp_path / "run"
    real = dcp_fs.FileSystem.create_stream

    @contextlib.contextmanager
    def full_in_step_4(self, path, mode):
        with real(self, path, mode) as stream:
            yield _FullAfter(stream, 100) if "step_00000004" in str(path) and "w" in mode else stream

    monkeypatch.setattr(dcp_fs.FileSystem, "create_stream", full_in_step_4)
    result = moec_cli("train", spec_path, "--run-dir", run, "--no-plots")
    assert result.exit_code == 1
    assert result.stderr == (f"error: no space left on the device writing {run}/checkpoints/step_00000004; "
                             f"the last complete checkpoint is {run}/checkpoints/step_00000002 (step 2)\n")
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial save was removed: its space is free again
    assert ckpt.verify_checkpoint(run / "checkpoints/step_00000002").step == 2
    monkeypatch.undo()
    result = moec_cli("train", spec_path, "--run-dir", run, "--no-plots", "--resume")
    assert result.exit_code == 0, result.output
    assert _losses(run) == _losses(finished)


class _OsWithFullDisk:
    """``os`` for moec.observe.metrics whose ``write`` fails half-way through the n-th row."""

    def __init__(self, fail_on):
        self.calls, self.fail_on = 0, fail_on

    def write(self, fd, data):
        self.calls += 1
        if self.calls == self.fail_on:
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    def __getattr__(self, name):
        return getattr(os, name)


def test_a_full_disk_during_a_metrics_write_leaves_no_torn_line(finished_run, tmp_path, monkeypatch):
    spec_path, finished = finished_run
    run = tmp_path / "run"
    monkeypatch.setattr(metrics, "os", _OsWithFullDisk(fail_on=5))  # rows: 1, 2, eval 2, 3, then 4 fails
    result = moec_cli("train", spec_path, "--run-dir", run, "--no-plots")
    assert result.exit_code == 1
    assert result.stderr == (f"error: no space left on the device writing {run}/metrics.jsonl; "
                             f"the last complete checkpoint is {run}/checkpoints/step_00000002 (step 2)\n")
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(line)["step"] for line in text.splitlines()] == [1, 2, 2, 3]
    monkeypatch.undo()
    result = moec_cli("train", spec_path, "--run-dir", run, "--no-plots", "--resume")
    assert result.exit_code == 0, result.output
    assert _losses(run) == _losses(finished)


def test_a_torn_last_line_is_skipped_and_reported_by_plot_and_resume(finished_run, tmp_path):
    spec_path, finished = finished_run
    run = copy_run(finished, tmp_path / "run")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    cut = rows[-1][: len(rows[-1]) // 2]  # a crash mid-append: no newline, cut in the middle
    (run / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n" + cut)
    result = moec_cli("plot", run)
    assert result.exit_code == 0, result.output
    assert result.stderr == f"note: {run}/metrics.jsonl:{len(rows)}: skipped a torn last line ({_json_reason(cut)})\n"
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    result = moec_cli("train", spec_path, "--run-dir", run, "--no-plots", "--resume-from", run / "checkpoints/step_00000002")
    assert result.exit_code == 0, result.output
    assert _losses(run) == _losses(finished)  # the torn row was dropped and written again


def test_damage_before_the_last_line_is_one_clean_error(finished_run, tmp_path):
    _, finished = finished_run
    run = copy_run(finished, tmp_path / "run")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    rows[1] = rows[1][:40]
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    result = moec_cli("plot", run)
    assert result.exit_code == 1
    assert result.stderr == f"error: {run}/metrics.jsonl:2: not a metrics row ({_json_reason(rows[1])})\n"


def _json_reason(text):
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return err.msg
    raise AssertionError("valid JSON")


def test_an_interrupted_resume_rewrite_keeps_the_old_metrics(finished_run, tmp_path, monkeypatch):
    _, finished = finished_run
    run = copy_run(finished, tmp_path / "run")
    before = (run / "metrics.jsonl").read_bytes()

    class KilledDuringRename(_OsWithFullDisk):
        def replace(self, src, dst):
            raise KeyboardInterrupt  # what a kill between writing the copy and renaming it looks like

    monkeypatch.setattr(metrics, "os", KilledDuringRename(fail_on=0))
    with pytest.raises(KeyboardInterrupt):
        MetricsWriter(run / "metrics.jsonl", truncate_after=2)
    assert (run / "metrics.jsonl").read_bytes() == before  # not 0 bytes: the old file is untouched
    assert [p.name for p in run.iterdir() if p.name.startswith(".metrics")] == []
    monkeypatch.undo()
    MetricsWriter(run / "metrics.jsonl", truncate_after=2)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 2]


@pytest.mark.parametrize("keep_last, at_save", [(2, 1), (1, 1)])
def test_old_checkpoints_are_pruned_before_a_save(tmp_path, monkeypatch, keep_last, at_save):
    text = quick_text(steps=5, every=1).replace("keep_last: 2}", f"keep_last: {keep_last}, keep_best: false}}")
    spec = moec.load_spec_text(text, file="prune.yaml")
    seen, real_save = [], ckpt.dcp.save

    def counting_save(state, checkpoint_id):
        seen.append(len(ckpt.checkpoint_dirs(tmp_path)))
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(ckpt.dcp, "save", counting_save)
    Trainer(spec, run_dir=tmp_path).run()
    # A save needs room for one checkpoint besides the newest complete one, never keep_last + 1.
    assert seen == [0] + [at_save] * 4
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == [f"step_{s:08d}" for s in range(6 - keep_last, 6)]


@pytest.mark.parametrize("value", ['""', '" "', ".", "./", "/", "../.."])
def test_root_like_checkpoint_dirs_are_refused_by_validation(tmp_path, value):
    spec_path = write_spec(tmp_path)
    spec_path.write_text(spec_path.read_text().replace("keep_last: 2}", f"keep_last: 2, dir: {value}}}"))
    result = moec_cli("validate", spec_path)
    assert result.exit_code == 1
    shown = repr(value.strip('"'))
    assert result.stderr == (f"error: {spec_path}:29:45: train.checkpoint.dir: {shown} is not a directory of its own; "
                             f"use e.g. runs/<name>\n1 of 1 spec(s) invalid\n")


@pytest.mark.parametrize("run_dir", ["", ".", "/", "~", "HOME", ".."])
def test_root_like_run_dirs_are_refused_and_nothing_is_written(tmp_path, monkeypatch, run_dir):
    spec_path = write_spec(tmp_path)
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    (work / "unrelated.txt").write_text("keep me")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "work"))
    value = str(tmp_path / "work") if run_dir == "HOME" else run_dir
    before = tree_digest(tmp_path)
    result = moec_cli("train", spec_path, "--run-dir", value, "--no-plots")
    assert result.exit_code == 1
    shown = value or "."  # typer turns an empty path into "."
    resolved = Path(shown).expanduser().resolve()
    assert result.stderr == (f"error: refusing run directory {shown!r} (it is {resolved}): a run writes metrics.jsonl, "
                             "plots and checkpoints there; use a directory of its own such as runs/<name>\n")
    assert tree_digest(tmp_path) == before
