from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SPEC_FILES = sorted((REPO / "specs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _run_from_repo(monkeypatch):
    # Spec paths in messages and snapshots are relative to the repository root.
    monkeypatch.chdir(REPO)
