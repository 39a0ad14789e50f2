"""Pipeline stages: consecutive blocks balanced by forward FLOPs per token (moec.passes.stages)."""

import itertools
import random

import pytest
from typer.testing import CliRunner

import moec
from moec.cli.main import app
from moec.passes.stages import balanced_split


def best_max(costs: list[float], stages: int) -> float:
    """The smallest possible costliest stage, by trying every set of cuts."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = (0, *cuts, len(costs))
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def test_uniform_blocks_split_evenly():
    assert balanced_split([1.0] * 96, 6) == tuple((16 * s, 16 * s + 15) for s in range(6))
    assert balanced_split([1.0] * 3, 3) == ((0, 0), (1, 1), (2, 2))
    assert balanced_split([1.0] * 5, 1) == ((0, 4),)


def test_a_heavy_last_block_gets_fewer_neighbours():
    # the head's cost joins the last block: its stage takes fewer blocks; the first stage the fewest
    assert balanced_split([1.0] * 7 + [3.0], 2) == ((0, 4), (5, 7))


@pytest.mark.parametrize("seed", range(100))
def test_split_is_optimal_and_consecutive(seed):
    rng = random.Random(seed)
    costs = [rng.choice([0.5, 1.0, 2.0, rng.uniform(0.1, 5.0)]) for _ in range(rng.randint(1, 9))]  # ties and not
    stages = rng.randint(1, len(costs))
    split = balanced_split(costs, stages)
    assert len(split) == stages and split[0][0] == 0 and split[-1][1] == len(costs) - 1
    assert all(first <= last for first, last in split) and all(a[1] + 1 == b[0] for a, b in zip(split, split[1:]))
    assert max(sum(costs[a:b + 1]) for a, b in split) == pytest.approx(best_max(costs, stages), rel=1e-9)


@pytest.fixture(scope="module")
def gpt_oss_120b():
    return moec.compile_spec(moec.load_spec("specs/gpt_oss_120b.yaml"))


def test_gpt_oss_120b_stages(gpt_oss_120b):
    stages = gpt_oss_120b.manifest["pipeline_stages"]
    # 96 blocks of 2.82 GFLOP/token and a 4.94 GFLOP/token head (vocab 201088) on 6 stages: 16 blocks each would
    # give the last stage 50.0 GFLOP; balanced, the costliest stage does 47.9
    assert [tuple(row["blocks"]) for row in stages] == [(0, 12), (13, 29), (30, 46), (47, 63), (64, 80), (81, 95)]
    assert max(row["forward_flops_per_token"] for row in stages) == 47_915_728_896
    assert sum(row["forward_flops_per_token"] for row in stages) == gpt_oss_120b.manifest["flops_per_token"]["forward"]
    assert sum(row["parameters"] for row in stages) == gpt_oss_120b.manifest["parameters"]["total"]
    assert max(row["bytes_per_device"] for row in stages) == gpt_oss_120b.manifest["memory_per_device"]["total_bytes"]
    assert ("PIPELINE_STAGES = ((0, 12), (13, 29), (30, 46), (47, 63), (64, 80), (81, 95))  # (first, last) block of each "
            "stage, balanced by forward FLOPs per token  # specs/gpt_oss_120b.yaml:43 sharding.pipeline") in gpt_oss_120b.parallel_source


def test_build_prints_the_stages(tmp_path):
    result = CliRunner().invoke(app, ["build", "specs/gpt_oss_120b.yaml", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "pipeline stages (balanced by forward FLOPs per token)" in result.output
    for line in ("0-12 (13)", "13-29 (17)", "81-95 (15)", "38.36 GiB"):
        assert line in result.output
