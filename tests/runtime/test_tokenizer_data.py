"""Text data through a Hugging Face tokenizer.json: vocabulary checked at validation, ids from the text."""

import glob
import sysconfig

import pytest

import moec
from moec.data.kinds import make_dataset
from tests.runtime.helpers import quick_text

tokenizers = pytest.importorskip("tokenizers")  # a dependency of transformers (the dev extra)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A byte-level BPE of 400 ids trained on the stdlib's json package (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "".join(open(path, encoding="utf-8").read() for path in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/json/*.py")))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"])
    tokenizer.train_from_iterator([text], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path, text


def spec_with(tokenizer: str, vocab: int = 512):
    text = quick_text().replace('files: ["stdlib:json/*.py"]}', f'files: ["stdlib:json/*.py"], tokenizer: "{tokenizer}"}}')
    return moec.load_spec_text(text.replace("vocab: 256", f"vocab: {vocab}"), file="q.yaml")


def test_windows_are_the_tokenizers_ids_of_the_text(tokenizer_file):
    from tokenizers import Tokenizer

    path, text = tokenizer_file
    data = make_dataset(spec_with(str(path)))
    batch = data.batch("train", 0, 8)
    assert int(batch.inputs.max()) < 400 and batch.inputs.dtype.is_floating_point is False
    decoded = [Tokenizer.from_file(str(path)).decode(row.tolist()) for row in batch.inputs]
    assert all(piece in text for piece in decoded)  # ASCII sources: every window decodes to a run of the text
    assert all(len(piece) > 32 for piece in decoded)  # 32 tokens hold more than 32 bytes: BPE merged them
    assert 1.5 < data.bytes_per_token < 6
    plain = make_dataset(spec_with("bytes"))
    assert plain.bytes_per_token == 1.0 and plain.fingerprint != data.fingerprint


def test_the_vocabulary_must_hold_the_tokenizers_ids(tokenizer_file, tmp_path):
    path, _ = tokenizer_file
    with pytest.raises(moec.SpecError) as caught:
        spec_with(str(path), vocab=300)
    assert [issue.message for issue in caught.value.issues] == [f"must be >= 400 for the ids of tokenizer {path}, got 300"]
    with pytest.raises(moec.SpecError, match=r"train.data.tokenizer: '/nowhere/tokenizer.json': no such file \(resolved against "):
        spec_with("/nowhere/tokenizer.json")
    (tmp_path / "bad.json").write_text('{"model": {}}')
    with pytest.raises(moec.SpecError, match=r"is not a Hugging Face tokenizer.json \(KeyError: 'vocab'\)"):
        spec_with(str(tmp_path / "bad.json"))


def test_data_prepare_writes_the_token_files_training_reads(tokenizer_file, tmp_path):
    import shlex

    import numpy as np
    from tokenizers import Tokenizer
    from typer.testing import CliRunner

    from moec.cli.main import app
    from moec.data.datasets import split_files

    path, _ = tokenizer_file
    spec_path = tmp_path / "q.yaml"
    spec_path.write_text(quick_text().replace("vocab: 256", "vocab: 512"))
    result = CliRunner().invoke(app, ["data", "prepare", str(spec_path), f"train.data.tokenizer={path}", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"wrote {tmp_path}/out/train.bin: ") and lines[1].startswith(f"wrote {tmp_path}/out/val.bin: ")
    override = shlex.split(lines[2])[-1]
    assert lines[2].startswith(f"train with: moec train {spec_path} ") and override == (
        f"train.data={{kind: token_files, train: [{tmp_path}/out/train.bin], val: [{tmp_path}/out/val.bin], dtype: uint16}}")
    ids = np.fromfile(tmp_path / "out" / "val.bin", dtype="<u2")
    val_text = "".join(p.read_text() for p in split_files(["stdlib:json/*.py"], 0.05)["val"])
    assert Tokenizer.from_file(str(path)).decode(ids.tolist()) == val_text  # every byte of the text, in order
    spec = moec.load_spec(spec_path, [override])
    assert make_dataset(spec).batch("train", 0, 4).inputs.shape == (4, 32)
    result = CliRunner().invoke(app, ["data", "prepare", str(spec_path), "train.data={kind: random_tokens}"])
    assert (result.exit_code, result.stderr) == (1, "error: moec data prepare tokenizes text sources; train.data.kind is 'random_tokens'\n")
