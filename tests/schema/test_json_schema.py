"""The exported JSON Schema is current, accepts every bundled spec and flags structural errors."""

import json

import jsonschema
import pytest
import yaml

from moec import json_schema
from tests.conftest import REPO, SPEC_FILES

COMMITTED = REPO / "moec.schema.json"


def test_committed_schema_is_current():
    generated = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    assert COMMITTED.read_text() == generated, "regenerate with: moec schema -o moec.schema.json"


@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_bundled_specs_satisfy_the_schema(path):
    jsonschema.Draft202012Validator(json_schema()).validate(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize(
    "fixture",
    ["unknown_key.error.unknown-key-routr-did-you-mean-router", "unknown_activation.error.got-swishglu-did-you-mean-swiglu",
     "string_for_int.error.must-be-an-integer-got-text-8", "absurd_experts.error.must-be-65536-got-1000000000000"],
)
def test_schema_rejects_structural_errors(fixture):
    data = yaml.safe_load((REPO / "tests/schema/errors" / f"{fixture}.yaml").read_text())
    assert list(jsonschema.Draft202012Validator(json_schema()).iter_errors(data))
