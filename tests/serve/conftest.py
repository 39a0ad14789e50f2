"""One tiny trained run shared by the serve tests (load_trained, moec eval, moec generate)."""

import pytest

from moec.train.trainer import Trainer
from tests.runtime.helpers import quick_spec


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("serve") / "run"
    result = Trainer(quick_spec(steps=8, every=4), run_dir=run_dir).run()
    return run_dir, result
