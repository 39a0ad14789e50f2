"""Expert parallelism on ``specs/deepseek_v3_tiny.yaml``: 2 CPU processes (gloo) against one process.

16 experts in 4 groups (top-4 from the 2 best groups, sigmoid scores with the selection bias, routed scaling, one
shared expert), 8 experts per ep rank; the batch is split over ep too. Kept apart from the tensor-parallel tests.
"""

import pytest

from tests.distributed.mla_tp_worker import deepseek_text
from tests.distributed.test_mla_tensor_parallel import assert_same_as_one_process, train
from tests.distributed.test_tensor_parallel import rows

EP2 = {"mesh": {"world_size": 2, "axes": {"ep": 2}}, "sharding": {"batch": ["ep"], "experts": ["ep"]}}


@pytest.mark.slow
def test_ep2_deepseek_v3_tiny_trains_like_one_process(tmp_path):
    single = train(tmp_path / "single", deepseek_text())
    run_dir = train(tmp_path / "ep2", deepseek_text(EP2), nproc=2)
    assert_same_as_one_process(run_dir, single)
    assert all(sent > 0 for sent in rows(run_dir, "train", "expert_parallel_bytes_sent"))  # routed rows crossed ranks
