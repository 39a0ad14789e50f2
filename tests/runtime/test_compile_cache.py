"""A second start of the same program: the training forward compiled ahead of time is loaded, not traced again."""

import pytest
import torch

import moec
from moec.checkpoint import compile_cache
from moec.observe.metrics import compiled_graphs
from moec.train.trainer import Trainer
from tests.runtime.helpers import quick_text

COMPILED = quick_text(steps=3, every=10).replace("compile: {enabled: false}", "compile: {fullgraph: true}")


def losses(tmp_path, name: str) -> list[float]:
    spec = moec.load_spec_text(COMPILED, file="quick.yaml")
    trainer = Trainer(spec, run_dir=tmp_path / name, device="cpu")
    assert isinstance(trainer.step_fn, compile_cache.AheadOfTime)
    return [trainer._train_step(step)["loss"] for step in range(3)]


@pytest.fixture(scope="module")
def first_start(tmp_path_factory):
    """One cold start in a fresh cache directory: compiles ahead of time and saves the function."""
    tmp_path = tmp_path_factory.mktemp("aot")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEC_CACHE_DIR", str(tmp_path / "cache"))
        return tmp_path, losses(tmp_path, "cold"), sorted((tmp_path / "cache").glob("*/*.aot"))


def test_a_second_start_loads_the_saved_forward_and_traces_nothing(first_start, monkeypatch):
    tmp_path, cold, saved = first_start
    assert [path.name for path in saved] == [f"torch-{torch.__version__}.8x32-int64.aot"]  # <batch x seq>-<dtype>
    monkeypatch.setenv("MOEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(compile_cache.AheadOfTime, "_compile", lambda *args: pytest.fail("compiled again"))
    before = compiled_graphs()
    warm = losses(tmp_path, "warm")
    assert compiled_graphs() == before  # no Dynamo trace in this start
    assert warm == cold  # bit for bit: the same compiled code


def test_inputs_the_guards_refuse_run_the_lazily_compiled_model(first_start, monkeypatch):
    tmp_path, _, _ = first_start
    monkeypatch.setenv("MOEC_CACHE_DIR", str(tmp_path / "cache"))
    spec = moec.load_spec_text(COMPILED, file="quick.yaml")
    trainer = Trainer(spec, run_dir=tmp_path / "guards", device="cpu")
    lazy = []
    trainer.step_fn.compiled = lambda inputs: lazy.append(inputs.shape) or "lazy"
    tokens = trainer.data.batch("train", 0, 8).inputs  # a window of a longer row, as in training (strides are guarded)
    assert trainer.step_fn(tokens) != "lazy" and lazy == []  # the saved function: its guards hold
    with torch.no_grad():  # another grad mode: the saved function's guards refuse it
        assert trainer.step_fn(tokens) == "lazy"
    assert lazy == [(8, 32)]


def test_a_damaged_artifact_is_compiled_again(first_start, monkeypatch, tmp_path):
    source_dir, _, saved = first_start
    cache = tmp_path / "cache"
    target = cache / saved[0].relative_to(source_dir / "cache")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a compiled function")
    monkeypatch.setenv("MOEC_CACHE_DIR", str(cache))
    compiled = []
    monkeypatch.setattr(compile_cache.AheadOfTime, "_compile", lambda self, key, inputs: compiled.append(key))
    spec = moec.load_spec_text(COMPILED, file="quick.yaml")
    trainer = Trainer(spec, run_dir=tmp_path / "run", device="cpu")
    trainer.step_fn.compiled = lambda inputs: "lazy"
    assert trainer.step_fn(torch.randint(0, 256, (8, 32))) == "lazy"
    assert compiled == ["8x32-int64"]
