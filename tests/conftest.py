import os
from pathlib import Path

import pytest

# Triton reads its interpreter switch once, when something first imports it (transformers and
# torch may, during collection): set it before any test module is imported, so moec's Triton
# kernels run under the interpreter on this CPU (tests/backends/test_triton_kernels.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SPEC_FILES = sorted((REPO / "specs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _run_from_repo(monkeypatch):
    # Spec paths in messages and snapshots are relative to the repository root.
    monkeypatch.chdir(REPO)
