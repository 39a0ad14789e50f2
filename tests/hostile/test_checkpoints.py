"""Checkpoints are what they claim: verified against manifest.json, damage refused in one line."""

import json
import shutil

import pytest

from moec.checkpoint import dcp as ckpt
from moec.observe.metrics import read_metrics
from tests.hostile.helpers import copy_run, moec_cli, reseal, tree_digest, write_spec

HINT = "; --resume-from latest-valid resumes from the newest checkpoint that verifies"
STEP4 = "checkpoints/step_00000004"


def _edit_meta(ck, change, seal):
    meta = json.loads((ck / "meta.json").read_text())
    (ck / "meta.json").write_text(json.dumps(change(meta), indent=1))
    if seal:
        reseal(ck)


def _flip_bit(ck):
    shard = ck / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def _truncate(ck, size):
    shard = ck / "__0_0.distcp"
    total = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:size])
    return total


# (id, damage(ck, run) -> None, expected message after "cannot resume: " with {ck} for the checkpoint)
DAMAGE = [
    ("step-45-to-30-style-edit", lambda ck, run: _edit_meta(ck, lambda m: m | {"step": 3}, seal=False),
     "{ck}/meta.json: sha256 does not match manifest.json (damaged or replaced)"),
    ("step-edit-resealed", lambda ck, run: _edit_meta(ck, lambda m: m | {"step": 3}, seal=True),
     "{ck}/meta.json: step 3 does not match the directory name step_00000004"),
    ("step-1000-resealed", lambda ck, run: _edit_meta(ck, lambda m: m | {"step": 1000}, seal=True),
     "{ck}/meta.json: step 1000 does not match the directory name step_00000004"),
    ("step-negative", lambda ck, run: _edit_meta(ck, lambda m: m | {"step": -5}, seal=True),
     "{ck}/meta.json: 'step' must be a positive integer, got -5"),
    ("step-string", lambda ck, run: _edit_meta(ck, lambda m: m | {"step": "4"}, seal=True),
     "{ck}/meta.json: 'step' must be a positive integer, got '4'"),
    ("meta-is-a-list", lambda ck, run: _edit_meta(ck, lambda m: [m], seal=True),
     "{ck}/meta.json: expected a JSON object, found list"),
    ("meta-lacks-step", lambda ck, run: _edit_meta(ck, lambda m: {k: v for k, v in m.items() if k != "step"}, seal=True),
     "{ck}/meta.json: no 'step'"),
    ("meta-lacks-spec", lambda ck, run: _edit_meta(ck, lambda m: {k: v for k, v in m.items() if k != "spec"}, seal=True),
     "{ck}/meta.json: 'spec' is missing or is not a resolved spec"),
    ("meta-not-json", lambda ck, run: ((ck / "meta.json").write_text("{\"step\": 4,"), reseal(ck)),
     "{ck}/meta.json: not valid JSON (Expecting property name enclosed in double quotes at line 1 column 12)"),
    ("shard-from-another-step", lambda ck, run: shutil.copy(run / "checkpoints/step_00000002/__0_0.distcp", ck / "__0_0.distcp"),
     "{ck}/__0_0.distcp: sha256 does not match manifest.json (damaged or replaced)"),
    ("one-flipped-bit", lambda ck, run: _flip_bit(ck),
     "{ck}/__0_0.distcp: sha256 does not match manifest.json (damaged or replaced)"),
    ("truncated-shard", lambda ck, run: _truncate(ck, 1000),
     "{ck}/__0_0.distcp: 1000 bytes, but manifest.json says {shard_size} (truncated or replaced)"),
    ("empty-shard", lambda ck, run: _truncate(ck, 0),
     "{ck}/__0_0.distcp: 0 bytes, but manifest.json says {shard_size} (truncated or replaced)"),
    ("missing-metadata", lambda ck, run: (ck / ".metadata").unlink(),
     "{ck}/.metadata: missing (listed in manifest.json)"),
    ("missing-manifest", lambda ck, run: (ck / "manifest.json").unlink(),
     "{ck}/manifest.json: missing"),
    ("extra-file", lambda ck, run: (ck / "__1_0.distcp").write_bytes(b"x"),
     "{ck}/__1_0.distcp: not listed in manifest.json (copied in from elsewhere?)"),
    ("truncated-metadata-resealed", lambda ck, run: ((ck / ".metadata").write_bytes((ck / ".metadata").read_bytes()[:50]), reseal(ck)),
     "{ck}/.metadata: not a DCP metadata file (UnpicklingError: pickle data was truncated)"),
]


@pytest.mark.parametrize("damage, expected", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_a_damaged_latest_checkpoint_is_refused_in_one_line_naming_the_file(finished_run, tmp_path, damage, expected):
    spec_path, run_dir = finished_run
    run = copy_run(run_dir, tmp_path / "run")
    ck = run / STEP4
    shard_size = (ck / "__0_0.distcp").stat().st_size
    damage(ck, run)
    before = tree_digest(run)
    result = moec_cli("train", spec_path, "--run-dir", run, "--resume", "--no-plots")
    assert result.exit_code == 1
    assert result.stderr == "error: cannot resume: " + expected.format(ck=ck, shard_size=shard_size) + HINT + "\n"
    assert "Traceback" not in result.output
    assert tree_digest(run) == before  # nothing deleted or rewritten, metrics.jsonl included


def test_resume_path_of_a_damaged_checkpoint_names_the_file(finished_run, tmp_path):
    spec_path, run_dir = finished_run
    run = copy_run(run_dir, tmp_path / "run")
    _flip_bit(run / STEP4)
    result = moec_cli("train", spec_path, "--run-dir", run, "--resume-from", run / STEP4, "--no-plots")
    assert result.exit_code == 1
    assert result.stderr == f"error: cannot resume: {run / STEP4}/__0_0.distcp: sha256 does not match manifest.json (damaged or replaced)\n"
    result = moec_cli("train", spec_path, "--run-dir", run, "--resume-from", tmp_path / "nowhere", "--no-plots")
    assert result.stderr == f"error: cannot resume: {tmp_path / 'nowhere'}: not a checkpoint directory (it does not exist)\n"


def test_latest_valid_falls_back_to_the_previous_checkpoint_and_ends_bitwise_equal(finished_run, tmp_path):
    spec_path, run_dir = finished_run
    run = copy_run(run_dir, tmp_path / "run")
    _flip_bit(run / STEP4)
    result = moec_cli("train", spec_path, "--run-dir", run, "--resume-from", "latest-valid", "--no-plots")
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert (f"skipping a damaged checkpoint: {run / STEP4}/__0_0.distcp: sha256 does not match manifest.json "
            "(damaged or replaced)") in out
    assert f"resuming from {run}/checkpoints/step_00000002 (step 2)" in out
    def losses(directory):
        return [r["loss"] for r in read_metrics(directory / "metrics.jsonl") if r["kind"] == "train"]
    assert losses(run) == losses(run_dir) and len(losses(run)) == 4  # steps 3-4 retrained to the same bits
    assert ckpt.verify_checkpoint(run / STEP4).step == 4  # the damaged one was replaced by a good one


def test_every_checkpoint_damaged_is_a_clean_refusal(finished_run, tmp_path):
    spec_path, run_dir = finished_run
    run = copy_run(run_dir, tmp_path / "run")
    for ck in ckpt.checkpoint_dirs(run):
        (ck / "manifest.json").unlink()
    result = moec_cli("train", spec_path, "--run-dir", run, "--resume-from", "latest-valid", "--no-plots")
    assert result.exit_code == 1
    assert result.stderr == f"error: nothing to resume: no checkpoint under {run}/checkpoints verifies\n"


def test_the_manifest_lists_every_file_with_size_sha256_step_spec_and_data(finished_run):
    _, run_dir = finished_run
    ck = run_dir / STEP4
    manifest = json.loads((ck / "manifest.json").read_text())
    assert sorted(manifest["files"]) == [".metadata", "__0_0.distcp", "meta.json"]
    assert manifest["step"] == 4 and manifest["format"] == 1
    assert manifest["spec_sha256"] == json.loads((ck / "meta.json").read_text())["spec_sha256"]
    assert len(manifest["data_fingerprint"]) == 64
    assert manifest["files"]["__0_0.distcp"]["size"] == (ck / "__0_0.distcp").stat().st_size


def _data_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"part{i}.txt").write_text(f"file {i}: " + "the quick brown fox jumps over the lazy dog. " * 20)
    spec_path = write_spec(tmp_path, files=f"{data}/*.txt")
    run = tmp_path / "run"
    assert moec_cli("train", spec_path, "--run-dir", run, "--no-plots", "--stop-at", "2").exit_code == 0
    return data, spec_path, run


def test_changed_data_files_refuse_a_resume_unless_allowed(tmp_path):
    data, spec_path, run = _data_run(tmp_path)
    saved = json.loads((run / "checkpoints/step_00000002/manifest.json").read_text())["data_fingerprint"]
    (data / "part1.txt").write_text("edited " * 100)
    result = moec_cli("train", spec_path, "--run-dir", run, "--resume", "--no-plots")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot resume from {run}/checkpoints/step_00000002: the training data changed "
                                    f"since the checkpoint (fingerprint {saved[:12]} -> ")
    assert result.stderr.endswith("); pass --allow-data-change to accept\n")
    result = moec_cli("train", spec_path, "--run-dir", run, "--resume", "--no-plots", "--allow-data-change")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4]


def test_a_checkpoint_with_the_names_from_before_nn_linear_is_refused_in_one_line(tmp_path):
    """attention.wq / mlp.w_up (raw parameters) became attention.wq.weight / mlp.w_up.weight: an old checkpoint is
    refused with one line naming a key and the way over (Hugging Face export and import), not DCP's missing-key error."""
    import torch.distributed.checkpoint as dcp

    import moec
    from tests.distributed.tp_worker import dense_text

    model = moec.build_model(moec.load_spec_text(dense_text(), file="old.yaml"))
    old = {name.replace(".weight", "") if (".attention.w" in name or ".mlp.w_" in name) else name: value
           for name, value in model.state_dict().items()}
    assert "blocks.0.attention.wq" in old and "blocks.0.mlp.w_down" in old
    dcp.save({"model": old}, checkpoint_id=str(tmp_path / "step_00000001"))
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.load_model_state(tmp_path / "step_00000001", model)
    message = str(refused.value)
    assert message == (f"{tmp_path / 'step_00000001'}: written by an older moec, whose state-dict names "
                       "(blocks.0.attention.wk) predate the nn.Linear ones (attention.wq.weight, mlp.w_up.weight); export "
                       "it to Hugging Face with that moec and import it here (moec export hf / moec import hf), or retrain")
    assert "\n" not in message


def test_a_checkpoint_with_split_gate_and_up_experts_is_refused_in_one_line(tmp_path):
    """experts.w_gate / experts.w_up became one experts.w_gate_up [E, 2, H, D]: an old checkpoint is refused with one
    line naming a key and the way over (its HF export, which the importer joins), not DCP's missing-key error."""
    import torch.distributed.checkpoint as dcp

    import moec

    model = moec.build_model(moec.load_spec("specs/token_routed_tiny.yaml"))
    old = dict(model.state_dict())
    gate, up = old.pop("blocks.0.moe.experts.w_gate_up").unbind(1)
    old |= {"blocks.0.moe.experts.w_gate": gate.contiguous(), "blocks.0.moe.experts.w_up": up.contiguous()}
    dcp.save({"model": old}, checkpoint_id=str(tmp_path / "step_00000001"))
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.load_model_state(tmp_path / "step_00000001", model)
    message = str(refused.value)
    assert message == (f"{tmp_path / 'step_00000001'}: written by an older moec, whose gated experts keep gate and up apart "
                       "(blocks.0.moe.experts.w_gate); this one holds them in one experts.w_gate_up [E, 2, H, D]: export it "
                       "to Hugging Face with that moec and import it here (moec export hf / moec import hf), or retrain")
    assert "\n" not in message
