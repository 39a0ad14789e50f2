"""One tiny trained run shared by the serve tests (load_trained, moec eval, moec generate), one server over it."""

import pytest

import moec
from moec.train.trainer import Trainer
from tests.runtime.helpers import quick_spec


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("serve") / "run"
    result = Trainer(quick_spec(steps=8, every=4), run_dir=run_dir).run()
    return run_dir, result


@pytest.fixture(scope="session")
def server(trained_run):
    """The URL of a server over the trained run: 4 slots, a queue of 32, a 256-token prefix cache."""
    pytest.importorskip("uvicorn")
    from tests.serve.helpers import running_server

    with running_server(trained_run[0], slots=4, queue_limit=32, prefix_cache_tokens=256) as url:
        yield url


@pytest.fixture(scope="session")
def trained_model(trained_run):
    """The run's model, loaded once, for the numbers the server's answers are checked against."""
    return moec.load_trained(trained_run[0])
