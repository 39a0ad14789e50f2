import os
from pathlib import Path

import pytest

# Triton reads its interpreter switch once, when something first imports it (transformers and
# torch may, during collection): set it before any test module is imported, so moec's Triton
# kernels run under the interpreter on this CPU (tests/backends/test_triton_kernels.py).
os.environ.setdefault("TRITON_INTERPRET", "1")
# kernels.moe auto takes its fixed rule in tests (the same program on every machine, nothing timed);
# tests/backends/test_kernel_choice.py lifts it where the measurement itself is tested.
os.environ.setdefault("MOEC_KERNEL_CHOICE", "fixed")

REPO = Path(__file__).resolve().parent.parent
SPEC_FILES = sorted((REPO / "specs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _run_from_repo(monkeypatch):
    # Spec paths in messages and snapshots are relative to the repository root.
    monkeypatch.chdir(REPO)
