"""Expert placement: balance, determinism and how many experts move when the ep size grows."""

import math
import subprocess
import sys

import pytest

from moec.backends.parallel.placement import moved, moves_when_growing, physical_order, placement
from tests.conftest import REPO

E = 64
CONTIGUOUS_MOVES = [32, 31, 33, 30, 32, 31, 35]  # ep n -> n+1 for n = 1..7, E = 64
HASH_MOVES = [32, 21, 16, 12, 10, 9, 8]  # floor(64 / (n+1)): the least any balanced placement moves


@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_growing_ep_moves_only_the_new_ranks_share(seed):
    for n in range(1, 8):
        before, after = placement("consistent_hash", E, n, seed), placement("consistent_hash", E, n + 1, seed)
        assert moved(before, after) == HASH_MOVES[n - 1] <= math.ceil(E / (n + 1)) + E // 16
        # every moved expert went to the new rank: none shuffles between old ranks
        assert {a for b, a in zip(before, after) if a != b} == {n}


def test_contiguous_moves_more_for_bigger_ep_sizes():
    contiguous = [moves_when_growing("contiguous", E, n) for n in range(1, 8)]
    hashed = [moves_when_growing("consistent_hash", E, n) for n in range(1, 8)]
    assert contiguous == CONTIGUOUS_MOVES and hashed == HASH_MOVES
    assert all(c > h for c, h in zip(contiguous[1:], hashed[1:]))  # equal (32) only from 1 to 2 ranks


@pytest.mark.parametrize("experts", [8, 60, 64, 100])
def test_every_rank_holds_an_equal_share(experts):
    for ranks in range(1, 17):
        for kind in ("contiguous", "consistent_hash"):
            loads = [placement(kind, experts, ranks, 5).count(r) for r in range(ranks)]
            assert set(loads) <= {experts // ranks, -(-experts // ranks)}, (kind, ranks, loads)


def test_contiguous_is_the_runtime_slices_and_the_hash_is_not():
    assert placement("contiguous", 8, 2) == (0, 0, 0, 0, 1, 1, 1, 1)
    assert physical_order(placement("contiguous", 8, 4), 4) == tuple(range(8))
    owners = placement("consistent_hash", 8, 2, 0)
    assert owners == (1, 0, 1, 0, 1, 0, 0, 1)
    assert physical_order(owners, 2) == (1, 3, 5, 6, 0, 2, 4, 7)


def test_the_hash_placement_is_the_same_in_another_python_process():
    """sha256, not hash(): PYTHONHASHSEED must not change it."""
    code = "from moec.backends.parallel.placement import placement; print(placement('consistent_hash', 64, 5, 3))"
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                              env={"PYTHONHASHSEED": str(s), "PATH": ""}).stdout for s in (1, 2)}
    assert outputs == {f"{placement('consistent_hash', 64, 5, 3)}\n"}
    assert placement("consistent_hash", 64, 5, 3) != placement("consistent_hash", 64, 5, 4)  # the seed matters


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown placement 'random'"):
        placement("random", 8, 2)
    with pytest.raises(ValueError, match="at least one expert and one rank"):
        placement("contiguous", 8, 0)
