"""Profiling, the step-time breakdown and memory in metrics.jsonl (one process; tests/distributed for two)."""

import csv
import gzip
import json

import pytest

import moec
from moec.backends.torch.phases import MOE_PHASES
from moec.observe.metrics import read_metrics
from moec.observe.plots import plot_run
from moec.observe.profile import parse_window
from moec.observe.step_time import PARTS
from moec.train.trainer import Trainer, TrainingError
from tests.runtime.helpers import quick_spec, quick_text


def test_a_profiled_run_writes_a_trace_with_the_moe_phases_and_a_summary_of_the_whole_step(tmp_path):
    result = Trainer(quick_spec(steps=6, every=100), run_dir=tmp_path, profile=(2, 4)).run()
    with gzip.open(tmp_path / "profile" / "rank0.pt.trace.json.gz", "rt") as handle:
        events = json.load(handle)["traceEvents"]
    names = {event.get("name") for event in events}
    assert {"moe.router", "moe.permute", "moe.experts", "moe.combine"} <= names
    assert sum(name.startswith("ProfilerStep#") for name in names if name) == 3  # steps 2, 3 and 4
    with open(tmp_path / "profile" / "rank0.summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    phases = [row for row in rows if row["section"] == "phase"]
    assert [row["name"] for row in phases][:-1] == [name for name in MOE_PHASES if name != "moe.all_to_all"]
    assert sum(float(row["share"]) for row in phases) == pytest.approx(1.0, abs=0.01)
    assert any(row["section"] == "operator" and row["name"] == "aten::mm" and int(row["flops"]) > 0 for row in rows)
    summary = result.profile.summary
    assert summary.steps == 3 and summary.flops > 0 and summary.flops_per_s > 0


def test_profile_windows_are_checked():
    assert parse_window("2:4") == (2, 4)
    for bad in ("4:2", "0:3", "2-4", "a:b"):
        with pytest.raises(ValueError, match="--profile"):
            parse_window(bad)


def test_a_profile_past_the_last_step_is_refused(tmp_path):
    with pytest.raises(TrainingError, match="--profile 5:9: the run has 6 steps"):
        Trainer(quick_spec(steps=6, every=100), run_dir=tmp_path, profile=(5, 9))


def test_memory_snapshots_are_refused_on_the_cpu(tmp_path):
    with pytest.raises(TrainingError, match="^--memory-snapshot records the CUDA caching allocator; this run is on cpu$"):
        Trainer(quick_spec(steps=2, every=100), run_dir=tmp_path, device="cpu", memory_snapshot=1)


def test_every_train_row_breaks_its_time_down_and_the_parts_cover_the_steps(tmp_path):
    Trainer(quick_spec(steps=20, every=10), run_dir=tmp_path).run()
    rows = [row for row in read_metrics(tmp_path / "metrics.jsonl") if row["kind"] == "train"]
    assert len(rows) == 20
    for row in rows:
        times = row["time_s"]
        assert set(times) == {"step", *PARTS} and all(seconds >= 0 for seconds in times.values())
        assert times["forward_backward"] > 0 and times["optimizer"] > 0
        assert row["memory"]["rss_bytes"] > 0 and row["memory"]["peak_rss_bytes"] >= row["memory"]["rss_bytes"] // 2
    assert rows[10]["time_s"]["checkpoint"] > 0 and rows[10]["time_s"]["eval"] > 0  # step 10's save and evaluation stall step 11
    step_total = sum(row["time_s"]["step"] for row in rows)
    parts_total = sum(row["time_s"][part] for row in rows for part in PARTS)
    assert parts_total == pytest.approx(step_total, rel=0.10)
    assert tmp_path / "step_time.png" in plot_run(tmp_path)


def test_train_profile_in_the_spec_is_the_window_unless_the_command_line_gives_one(tmp_path):
    spec = moec.load_spec_text(quick_text(steps=4, every=100), file="q.yaml", overrides=["train.profile={start: 2, end: 3}"])
    assert Trainer(spec, run_dir=tmp_path / "a").profile_window == (2, 3)
    assert Trainer(spec, run_dir=tmp_path / "b", profile=(1, 1)).profile_window == (1, 1)
