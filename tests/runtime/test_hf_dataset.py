"""``kind: hf_dataset``: a text column of local parquet / jsonl files through ``datasets``, no network."""

import json

import pytest

import moec
from moec.data.kinds import make_dataset
from tests.runtime.helpers import quick_text

pytest.importorskip("datasets")  # the dev extra installs it


def rows(prefix: str, count: int) -> list[dict]:
    return [{"id": i, "text": f"{prefix} row {i}: " + "the quick brown fox jumps over the lazy dog. " * 3} for i in range(count)]


@pytest.fixture
def dataset_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows("train", 200)), tmp_path / "train-00000.parquet")
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows("val", 50)))
    return tmp_path


def spec_for(directory, train="train-*.parquet", val="val.jsonl", extra=""):
    data = f'{{kind: hf_dataset, train: ["{directory}/{train}"], val: ["{directory}/{val}"]{extra}}}'
    text = quick_text().replace('{kind: text, files: ["stdlib:json/*.py"]}', data)
    return moec.load_spec_text(text, file="q.yaml")


def test_windows_come_from_the_text_column_and_repeat(dataset_files, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(dataset_files / "hf-home"))  # nothing may be written there
    data = make_dataset(spec_for(dataset_files))
    train_text = "".join(row["text"] + "\n" for row in rows("train", 200))
    val_text = "".join(row["text"] + "\n" for row in rows("val", 50))
    assert bytes(data.data["train"].numpy()).decode() == train_text and bytes(data.data["val"].numpy()).decode() == val_text
    batch = data.batch("train", 7, 4)
    assert all(bytes(row.tolist()).decode() in train_text for row in batch.inputs)
    assert make_dataset(spec_for(dataset_files)).batch("train", 7, 4).inputs.equal(batch.inputs)  # resume sees the same
    assert not (dataset_files / "hf-home").exists()


def test_bad_dataset_specs_are_one_line(dataset_files):
    with pytest.raises(moec.SpecError, match=r"train.data.val\[0\]: '.*/val.csv': not a dataset file this reads "
                                             r"\(.parquet, .arrow, .json, .jsonl\)"):
        spec_for(dataset_files, val="val.csv")
    with pytest.raises(moec.SpecError, match=r"train.data.train\[0\]: '.*/missing-\*.parquet' matches no file"):
        spec_for(dataset_files, train="missing-*.parquet")
    with pytest.raises(ValueError, match=r"train.data.text_field: 'body' is not a column of .*train-00000.parquet "
                                         r"\(columns: id, text\)"):
        make_dataset(spec_for(dataset_files, extra=", text_field: body"))


def test_missing_packages_are_validation_errors(dataset_files, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("datasets", "tokenizers") else real(name, *a))
    with pytest.raises(moec.SpecError) as caught:
        spec_for(dataset_files, extra=", tokenizer: tok.json")
    assert [issue.message for issue in caught.value.issues] == [
        "'hf_dataset' needs the datasets package: pip install 'moec[hf-data]'",
        "a tokenizer.json needs the tokenizers package: pip install 'moec[tokenizers]'"]
