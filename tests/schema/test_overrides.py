"""Command-line overrides: parsing, the schema's checks on them, errors that point at the argument."""

import pytest
from typer.testing import CliRunner

import moec
from moec.cli.main import app
from moec.schema.overrides import is_override, parse_path
from tests.runtime.helpers import quick_text

ALLOWED_TRAIN_KEYS = ("seed, steps, batch, seq_len, grad_accum, optimizer, lr_schedule, grad_clip, data, checkpoint, eval, log, profile, "
                      "collective_timeout_s")


def load(*overrides):
    return moec.load_spec_text(quick_text(steps=12, every=4), file="quick.yaml", overrides=overrides)


def errors(*overrides) -> list[str]:
    with pytest.raises(moec.SpecError) as caught:
        load(*overrides)
    return [str(issue) for issue in caught.value.issues]


def test_overrides_set_scalars_lists_and_indexed_layers():
    spec = load("train.steps=50", "model.blocks[0].layers[1].experts=8", "train.optimizer.lr=1e-3",
                "train.optimizer.betas=[0.8, 0.99]", "schedule.deterministic=false", "description=a trial")
    assert spec.train.steps == 50 and spec.model.blocks[0].layers[1].experts == 8
    assert spec.train.optimizer.lr == 1e-3 and spec.train.optimizer.betas == (0.8, 0.99)
    assert spec.schedule.deterministic is False and spec.description == "a trial"
    assert [o.text for o in spec.source.overrides] == ["train.steps=50", "model.blocks[0].layers[1].experts=8",
                                                        "train.optimizer.lr=1e-3", "train.optimizer.betas=[0.8, 0.99]",
                                                        "schedule.deterministic=false", "description=a trial"]


def test_a_missing_section_is_created_and_later_overrides_win():
    spec = load("sharding.batch=[]", "train.steps=5", "train.steps=7")
    assert spec.train.steps == 7


def test_the_manifest_and_generated_header_record_the_overrides():
    plain = moec.compile_spec(load())
    program = moec.compile_spec(load("train.steps=50"))
    assert plain.manifest["spec"]["overrides"] == []
    assert program.manifest["spec"]["overrides"] == ["train.steps=50"]
    assert program.manifest["spec"]["sha256"] == plain.manifest["spec"]["sha256"]  # the file's; the overrides beside it
    assert f"sha256 {plain.manifest['spec']['sha256']}; overrides: train.steps=50\n" in program.source


def test_an_unknown_key_points_at_the_argument():
    assert errors("train.stpes=5") == [
        f"command line: train.stpes: unknown key 'stpes'; did you mean 'steps'? (allowed keys: {ALLOWED_TRAIN_KEYS})"]


def test_a_bad_value_is_checked_by_the_schema_and_points_at_the_argument():
    assert errors("train.steps=0", "model.blocks[0].layers[1].top_k=many") == [
        "command line: train.steps: must be >= 1, got 0",
        "command line: model.blocks[0].layers[1].top_k: must be an integer, got text 'many'",
    ]


def test_malformed_overrides_are_all_reported():
    assert errors("latest-valid", "train.x[=1", "train.steps=", "train.seed=1:20") == [
        "command line: 'latest-valid' is not an override (write KEY=VALUE, e.g. train.steps=50); "
        "to resume from a checkpoint use --resume or --resume-from PATH",
        "command line: 'train.x[' is not a key path (write names joined by '.', with [N] for list items, "
        "e.g. model.blocks[0].layers[1].experts)",
        "command line: train.seed: cannot read the value '1:20': '1:20' is a YAML 1.1 base-60 number (it would read as 80); "
        "write the number, or quote it for a string",
        "command line: train.steps: needs a value after '=' (write null for null, or '' for an empty string)",
    ]


def test_paths_that_do_not_exist_in_the_spec():
    assert errors("model.blocks[3].repeat=2") == [
        "command line: model.blocks[3].repeat: index 3 is out of range: the spec has 1 item(s) here"]
    assert errors("train.steps.x=1") == ["command line: train.steps.x: cannot set 'x' inside the value 12"]
    assert errors("model.blocks[0].repeat[1]=2") == ["command line: model.blocks[0].repeat[1]: [1]: the value 2 is not a list"]


def test_parse_path_and_override_detection():
    assert parse_path("model.blocks[0].layers[12].experts") == ("model", "blocks", 0, "layers", 12, "experts")
    assert is_override("train.steps=5") and is_override("model.blocks[0].top_k=2")
    assert not is_override("specs/x.yaml") and not is_override("--resume") and not is_override("=5")


def test_every_beyond_steps_means_only_at_the_end():
    spec = load("train.steps=3")  # eval.every and checkpoint.every are 4: no further edits needed
    assert spec.train.steps == 3 and spec.train.eval.every == 4


def test_validate_and_build_take_overrides(tmp_path):
    spec_path = tmp_path / "quick.yaml"
    spec_path.write_text(quick_text())
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(spec_path), "train.stpes=5"])
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        f"error: command line: train.stpes: unknown key 'stpes'; did you mean 'steps'? (allowed keys: {ALLOWED_TRAIN_KEYS})",
        "1 of 1 spec(s) invalid"]
    result = runner.invoke(app, ["validate", "--resolved", str(spec_path), "model.blocks[0].layers[1].experts=8"])
    assert result.exit_code == 0 and "    experts: 8\n" in result.stdout
    result = runner.invoke(app, ["build", str(spec_path), "train.seq_len=16", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert '"overrides": [\n      "train.seq_len=16"\n    ]' in manifest and '"seq_len": 16' in manifest


def test_an_error_elsewhere_does_not_report_defaults_that_resolve_later():
    """A regression head's out_dims defaults to inputs.dims: the checks that run on a partly invalid spec
    must not read the unresolved None as a mismatch (it was reported beside the real error)."""
    with pytest.raises(moec.SpecError) as caught:
        moec.load_spec("specs/spectral_moe_dp2_ep2.yaml", overrides=["train.steps=10"])
    assert [str(issue) for issue in caught.value.issues] == [
        "specs/spectral_moe_dp2_ep2.yaml:48:45: train.lr_schedule.warmup_steps: must be <= steps (10), got 15"]
