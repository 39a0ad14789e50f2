"""``kind: token_files``: memory-mapped token ids, windows from the files, bounded memory, exact resume."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import moec
from moec.data.kinds import make_dataset
from moec.observe.metrics import read_metrics
from moec.train.trainer import Trainer
from tests.conftest import REPO
from tests.runtime.helpers import quick_text

VOCAB = 4096


def token_spec(tmp_path, steps=4, every=2, dtype="uint16", train="train_*.bin", val="val.bin", vocab=VOCAB):
    data = f'{{kind: token_files, train: ["{tmp_path}/{train}"], val: ["{tmp_path}/{val}"], dtype: {dtype}}}'
    text = quick_text(steps=steps, every=every).replace('{kind: text, files: ["stdlib:json/*.py"]}', data)
    assert data in text
    return moec.load_spec_text(text.replace("vocab: 256", f"vocab: {vocab}"), file="tokens.yaml")


@pytest.fixture
def token_dir(tmp_path):
    """Two train files (ids counting up mod 1000, the second from 2000) and a val file."""
    (np.arange(5000) % 1000).astype(np.uint16).tofile(tmp_path / "train_a.bin")
    (2000 + np.arange(3000) % 1000).astype(np.uint16).tofile(tmp_path / "train_b.bin")
    (np.arange(2000) % 7).astype(np.uint16).tofile(tmp_path / "val.bin")
    return tmp_path


def test_windows_are_runs_of_one_file_and_a_function_of_seed_split_index(token_dir):
    data = make_dataset(token_spec(token_dir))
    batch = data.batch("train", 3, 64)
    window = torch.cat([batch.inputs, batch.targets[:, -1:]], 1)
    assert torch.all((window[:, 1:] - window[:, :-1]) % 1000 == 1)  # runs of the files, as written
    assert torch.equal(batch.targets[:, :-1], batch.inputs[:, 1:])
    assert torch.equal(data.batch("train", 3, 64).inputs, make_dataset(token_spec(token_dir)).batch("train", 3, 64).inputs)
    assert not torch.equal(data.batch("train", 4, 64).inputs, batch.inputs)
    val = data.batch("val", 0, 8).inputs
    assert int(val.max()) < 7 and val.dtype == torch.int64
    # a window never crosses from one file into the next; both files are drawn, in proportion to their windows
    windows = torch.cat([torch.cat([b.inputs, b.targets[:, -1:]], 1) for b in (data.batch("train", i, 64) for i in range(20))])
    in_b = windows[:, 0] >= 2000
    assert torch.equal((windows >= 2000).all(1), in_b) and torch.equal((windows < 1000).all(1), ~in_b)
    share_b = (3000 - 32) / (5000 - 32 + 3000 - 32)
    assert abs(in_b.float().mean().item() - share_b) < 0.06


def test_a_glob_that_matches_nothing_is_a_validation_error(tmp_path):
    with pytest.raises(moec.SpecError) as caught:
        token_spec(tmp_path, train="nothing_*.bin")
    line = next(line for line in quick_text().splitlines() if "data:" in line)
    row = quick_text().splitlines().index(line) + 1
    data_line = f'  data: {{kind: token_files, train: ["{tmp_path}/nothing_*.bin"], val: ["{tmp_path}/val.bin"], dtype: uint16}}'
    train_col, val_col = data_line.index(f'"{tmp_path}/nothing') + 1, data_line.index(f'"{tmp_path}/val') + 1
    assert [str(issue) for issue in caught.value.issues] == [
        f"tokens.yaml:{row}:{train_col}: train.data.train[0]: '{tmp_path}/nothing_*.bin' matches no file (resolved against {REPO})",
        f"tokens.yaml:{row}:{val_col}: train.data.val[0]: '{tmp_path}/val.bin' matches no file (resolved against {REPO})",
    ]


def test_bad_files_are_one_line(token_dir):
    with pytest.raises(moec.SpecError, match="uint16 holds ids below 65536, but model.inputs.vocab is 70000; use uint32"):
        token_spec(token_dir, vocab=70000)
    (token_dir / "val.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match=r"val.bin has 3 bytes, not a whole number of 2-byte token ids \(is train.data.dtype right\?\)"):
        make_dataset(token_spec(token_dir))
    np.full(100, 5000, dtype=np.uint16).tofile(token_dir / "val.bin")
    data = make_dataset(token_spec(token_dir))
    with pytest.raises(ValueError, match="val.bin holds token id 5000, but model.inputs.vocab is 4096"):
        data.batch("val", 0, 2)


def test_training_on_token_files_resumes_exactly(token_dir):
    spec = token_spec(token_dir, steps=4, every=2)
    Trainer(spec, run_dir=token_dir / "full").run()
    Trainer(spec, run_dir=token_dir / "split").run(stop_at=2)
    Trainer(spec, run_dir=token_dir / "split", resume="latest").run()

    def losses(run):
        return [row["loss"] for row in read_metrics(run / "metrics.jsonl") if row["kind"] == "train"]

    assert len(losses(token_dir / "full")) == 4 and losses(token_dir / "split") == losses(token_dir / "full")
    evals = [row for row in read_metrics(token_dir / "full" / "metrics.jsonl") if row["kind"] == "eval"]
    assert "val_bits_per_token" in evals[0] and "val_bits_per_byte" not in evals[0]  # the bytes behind the ids are unknown


def test_memory_does_not_grow_with_the_file(tmp_path):
    """A 64 MiB file, 200 batches of 8 x 1024 after a first one (a fresh process): anonymous memory grows by
    a few MiB, and resident file pages are those of the windows drawn, not the file."""
    (np.arange(32 << 20) % 50000).astype(np.uint16).tofile(tmp_path / "big.bin")
    script = textwrap.dedent(f"""
        import json
        from moec.data.token_files import TokenFiles
        def rss():
            fields = dict(line.split(":") for line in open("/proc/self/status") if line.startswith("Rss"))
            return {{key: int(value.split()[0]) * 1024 for key, value in fields.items()}}
        data = TokenFiles(0, 1024, False, [{str(tmp_path / 'big.bin')!r}], [{str(tmp_path / 'big.bin')!r}], "uint16", 50000)
        data.batch("train", 0, 8)  # the first batch pages in library code (file-backed): not the data's share
        before = rss()
        for i in range(1, 201):
            data.batch("train", i, 8)
        after = rss()
        print(json.dumps({{key: after[key] - before[key] for key in after}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    grew = json.loads(done.stdout)
    assert grew["RssAnon"] < 8 << 20, grew
    assert grew["RssFile"] < 8 << 20, grew  # no page of the file stays mapped
