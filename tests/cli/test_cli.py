"""The command line: exit codes 0 / 1 / 2, grep-able messages, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from moec.cli.main import app
from tests.conftest import REPO, SPEC_FILES

runner = CliRunner()
TOP_K = "tests/schema/errors/top_k_over_experts.error.top-k-must-be-experts-8-got-12.yaml"
UNKNOWN_KEY = "tests/schema/errors/unknown_key.error.unknown-key-routr-did-you-mean-router.yaml"


def test_validate_all_bundled_specs_exits_0():
    result = runner.invoke(app, ["validate", *[str(p.relative_to(REPO)) for p in SPEC_FILES]])
    assert result.exit_code == 0, result.stderr
    assert "specs/gpt_oss_120b.yaml: ok (gpt_oss_120b, ~120.9B parameters, 192 device(s))" in result.stdout.splitlines()
    assert len(result.stdout.splitlines()) == len(SPEC_FILES)


def test_invalid_specs_exit_1_with_every_message_and_no_traceback():
    result = runner.invoke(app, ["validate", "specs/spectral_moe.yaml", TOP_K, UNKNOWN_KEY])
    assert result.exit_code == 1
    assert result.stdout == "specs/spectral_moe.yaml: ok (spectral_moe, ~2.2M parameters, 64 device(s))\n"
    assert result.stderr.splitlines() == [
        f"error: {TOP_K}:14:18: model.blocks[0].layers[1].top_k: must be <= experts (8), got 12",
        f"error: {UNKNOWN_KEY}:15:11: model.blocks[0].layers[1].routr: unknown key 'routr'; did you mean 'router'? "
        "(allowed keys: experts, top_k, expert, router, capacity, shared_experts, aux, kind, name)",
        "2 of 3 spec(s) invalid",
    ]
    assert "Traceback" not in result.output


def test_usage_errors_exit_2():
    assert runner.invoke(app, ["validate"]).exit_code == 2
    assert runner.invoke(app, ["validate", "--no-such-flag", "x.yaml"]).exit_code == 2
    assert runner.invoke(app, ["frobnicate"]).exit_code == 2


def test_resolved_prints_a_spec_that_validates_to_the_same_thing(tmp_path):
    result = runner.invoke(app, ["validate", "--resolved", "specs/token_routed_tiny.yaml"])
    assert result.exit_code == 0
    data = yaml.safe_load(result.stdout)
    moe = data["model"]["blocks"][0]["layers"][1]
    assert (moe["kind"], moe["expert"]["hidden"], moe["capacity"]["mode"]) == ("moe", 128, "dropless")
    assert data["model"]["blocks"][0]["layers"][0]["head_dim"] == 16  # derived: 64 // 4
    (tmp_path / "again.yaml").write_text(result.stdout)
    again = runner.invoke(app, ["validate", "--resolved", str(tmp_path / "again.yaml")])
    assert again.exit_code == 0 and again.stdout == result.stdout


def test_schema_is_json_and_written_to_file(tmp_path):
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "Spec" and schema["additionalProperties"] is False
    out = tmp_path / "s.json"
    assert runner.invoke(app, ["schema", "-o", str(out)]).exit_code == 0
    assert json.loads(out.read_text()) == schema


def test_console_script_runs_and_help_does_not_import_torch():
    # The installed entry point, in a fresh interpreter: --help must stay instant.
    code = "import sys; from moec.cli.main import app; sys.argv=['moec','--help']\ntry: app()\nexcept SystemExit: pass\nprint('torch' in sys.modules, 'moec.schema' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip().endswith("False False")
    moec_script = Path(sys.executable).parent / "moec"  # installed next to this interpreter
    done = subprocess.run([str(moec_script), "validate", TOP_K], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1 and done.stderr.startswith(f"error: {TOP_K}:14:18:")
