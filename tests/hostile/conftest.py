import pytest

from moec.train.trainer import Trainer
from tests.hostile.helpers import write_spec
from tests.runtime.helpers import quick_spec


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (copy it before damaging it)."""
    root = tmp_path_factory.mktemp("finished")
    spec_path = write_spec(root)
    run_dir = root / "run"
    Trainer(quick_spec(steps=4, every=2), run_dir=run_dir).run()
    return spec_path, run_dir
