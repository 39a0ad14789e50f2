"""Each ``errors/<what>.error.<expected-message>.yaml`` must fail with that message, at the
location its trailing ``# expect-at: LINE:COL key.path`` comment gives."""

import re
from pathlib import Path

import pytest

import moec
from moec.schema.errors import format_path

FIXTURES = sorted((Path(__file__).parent / "errors").glob("*.error.*.yaml"))
EXPECT_AT = re.compile(r"^# expect-at: (\d+):(\d+) (\S+)$", re.MULTILINE)


def _normalized(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def test_there_are_enough_fixtures():
    assert len(FIXTURES) >= 25


@pytest.mark.parametrize("path", FIXTURES, ids=[p.name.split(".error.")[0] for p in FIXTURES])
def test_fixture_fails_with_its_message_at_its_location(path):
    expected = _normalized(path.name.split(".error.")[1].removesuffix(".yaml").replace("-", " "))
    line, column, key = EXPECT_AT.search(path.read_text()).groups()
    with pytest.raises(moec.SpecError) as caught:
        moec.load_spec(path)
    issues = caught.value.issues
    matching = [i for i in issues if expected in _normalized(f"{format_path(i.path) if i.path else ''} {i.message}")]
    assert matching, f"no issue mentions '{expected}': {[str(i) for i in issues]}"
    issue = matching[0]
    assert (issue.line, issue.column) == (int(line), int(column))
    assert (format_path(issue.path) if issue.path else "-") == key
    assert str(issue).startswith(f"{path}:{line}:{column}: ")
    assert "Traceback" not in str(caught.value)
