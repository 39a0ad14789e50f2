"""Hostile YAML: each case is one clean FILE:LINE:COL message and exit 1, never a traceback."""

import pytest

from tests.hostile.helpers import moec_cli
from tests.runtime.helpers import quick_text

CASES = [
    # (id, replace this, with this, expected message after "FILE:")
    ("flow-nesting-600", "steps: 12", "steps: " + "[" * 600 + "]" * 600, "23:72: nesting deeper than 64 levels"),
    ("raw-nul", "name: quick", "name: qu\x00ick",
     "2:9: control character U+0000 is not allowed in a spec (YAML allows only printable text)"),
    ("raw-esc", "name: quick", "name: qu\x1bick",
     "2:9: control character U+001B is not allowed in a spec (YAML allows only printable text)"),
    ("raw-del", "name: quick", "name: qu\x7fick",
     "2:9: control character U+007F is not allowed in a spec (YAML allows only printable text)"),
    ("int-of-5000-digits", "steps: 12", "steps: " + "9" * 5000, "23:10: train.steps: a number of 5000 digits is too long to read"),
    ("version-true", "version: 1", "version: true", "1:10: version: must be the integer 1, got a boolean True"),
    ("version-1.0", "version: 1", "version: 1.0", "1:10: version: must be the integer 1, got a number 1.0"),
    ("base-60-int", "steps: 12", "steps: 1:20",
     "23:10: train.steps: '1:20' is a YAML 1.1 base-60 number (it would read as 80); write the number, or quote it for a string"),
    ("base-60-float", "lr: 3.0e-3", "lr: 1:20.5",
     "26:19: train.optimizer.lr: '1:20.5' is a YAML 1.1 base-60 number (it would read as 80.5); write the number, or quote it "
     "for a string"),
    ("base-60-in-a-string-field", "name: quick", "name: 1:20",
     "2:7: name: '1:20' is a YAML 1.1 base-60 number (it would read as 80); write the number, or quote it for a string"),
]


@pytest.mark.parametrize("old, new, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_yaml_is_one_clean_line(tmp_path, old, new, expected):
    text = quick_text()
    assert old in text
    spec = tmp_path / "hostile.yaml"
    spec.write_bytes(text.replace(old, new).encode())
    result = moec_cli("validate", spec)
    assert result.exit_code == 1
    assert result.stderr == f"error: {spec}:{expected}\n1 of 1 spec(s) invalid\n"
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_quoted_base_60_string_and_version_1_still_load(tmp_path):
    spec = tmp_path / "fine.yaml"
    spec.write_text(quick_text().replace("name: quick", "name: '1:20'"))
    result = moec_cli("validate", spec)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{spec}: ok (1:20, ")
