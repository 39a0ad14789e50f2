"""Expert placement: which expert-parallel rank owns each expert (``sharding.placement``).

``placement(kind, experts, ranks, seed)`` returns the owner rank of every expert; pure and
deterministic across processes and Python runs (hashes come from ``hashlib``, never ``hash()``).

- ``contiguous``: rank r owns experts [floor(r*E/P), floor((r+1)*E/P)); E/P consecutive
  experts each when P divides E.
- ``consistent_hash``: a seeded hash ring with virtual nodes and bounded loads. Experts and
  each rank's ``VIRTUAL_NODES`` virtual nodes are points on a 64-bit ring (sha256 of the seed and
  the name). The placement on P ranks grows from the one on P - 1: the new rank takes
  floor(E/P) experts, one at a time, each from a rank that holds the most experts now (the bound
  on loads), choosing among their experts the one whose ring point lies closest after one of the
  new rank's virtual nodes (the arc a plain hash ring would give it).

Balance: every rank owns floor(E/P) or ceil(E/P) experts, exactly E/P when P divides E (the
runtime's equal ``Shard(0)`` slices need that). Proof: taking always from a fullest rank keeps the
old ranks within one expert of each other; with E = f(P) + r (f = floor(E/P), 0 <= r < P) they end
holding E - f experts in total, f + r/(P-1) on average, so floor f and ceil f + [r > 0].

Movement, growing from P to P + 1 ranks: exactly floor(E/(P+1)) experts move, all of them onto the
new rank, and none between old ranks. This is the least any balanced placement can move: the new
rank must hold at least floor(E/(P+1)) experts, and every one of them moved. Shrinking from P + 1
to P moves the same experts back. (A plain ring with bounded loads, Mirrokni et al. 2018, cascades
overflow along the ring: for E = 64, seeds 0-4, it moved up to 17 experts from 6 to 7 ranks, against 9
here.) Contiguous placement re-slices everything: for E = 64 it moves 32, 31, 33, 30, 32, 31, 35 experts
growing from 1, 2, ..., 7 ranks, against 32, 21, 16, 12, 10, 9, 8 here (tests/moe/test_placement.py).
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Literal

PlacementKind = Literal["contiguous", "consistent_hash"]
VIRTUAL_NODES = 64  # points per rank on the ring: more evens out the arcs, costs only build time
RING = 1 << 64


def placement(kind: PlacementKind, experts: int, ranks: int, seed: int = 0) -> tuple[int, ...]:
    """The owner rank of each expert 0 .. experts - 1."""
    if experts < 1 or ranks < 1:
        raise ValueError(f"placement needs at least one expert and one rank, got {experts} and {ranks}")
    if kind == "contiguous":
        return tuple(e * ranks // experts for e in range(experts))
    if kind == "consistent_hash":
        return _consistent_hash(experts, ranks, seed)
    raise ValueError(f"unknown placement {kind!r} (contiguous, consistent_hash)")


def moved(before: tuple[int, ...], after: tuple[int, ...]) -> int:
    """How many experts change owner between two placements of the same experts."""
    assert len(before) == len(after), "placements of different expert counts"
    return sum(a != b for a, b in zip(before, after))


def moves_when_growing(kind: PlacementKind, experts: int, ranks: int, seed: int = 0) -> int:
    """Experts that change owner when the expert-parallel size grows from ``ranks`` to ``ranks + 1``."""
    return moved(placement(kind, experts, ranks, seed), placement(kind, experts, ranks + 1, seed))


def experts_of(owners: tuple[int, ...], ranks: int) -> list[list[int]]:
    """Each rank's experts, ascending."""
    held: list[list[int]] = [[] for _ in range(ranks)]
    for expert, rank in enumerate(owners):
        held[rank].append(expert)
    return held


def physical_order(owners: tuple[int, ...], ranks: int) -> tuple[int, ...]:
    """The expert at each physical slot: experts grouped by owner rank, each rank's ascending.

    Sharding the [E, ...] weights on dim 0 in this order gives every rank its own experts.
    """
    return tuple(expert for held in experts_of(owners, ranks) for expert in held)


def _point(seed: int, *name) -> int:
    digest = hashlib.sha256(":".join(map(str, (seed, *name))).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _consistent_hash(experts: int, ranks: int, seed: int) -> tuple[int, ...]:
    points = [_point(seed, "expert", e) for e in range(experts)]
    owners = [0] * experts
    load = [experts] + [0] * (ranks - 1)
    for new in range(1, ranks):
        arc = _arc_lengths(points, sorted(_point(seed, "rank", new, v) for v in range(VIRTUAL_NODES)))
        by_arc = sorted(range(experts), key=lambda e: (arc[e], e))  # closest after one of new's nodes first
        for _ in range(experts // (new + 1)):
            fullest = max(load[:new])
            expert = next(e for e in by_arc if owners[e] != new and load[owners[e]] == fullest)
            load[owners[expert]] -= 1
            owners[expert], load[new] = new, load[new] + 1
    return tuple(owners)


def _arc_lengths(points: list[int], nodes: list[int]) -> list[int]:
    """For each point, the distance clockwise from the nearest node before it on the ring."""
    out = []
    for p in points:
        before = nodes[bisect.bisect_right(nodes, p) - 1]  # index -1 wraps to the last node
        out.append((p - before) % RING)
    return out


def node_limit(groups: int, top_groups: int, kind: str, ranks: int) -> int | None:
    """The most ranks one token's rows reach when a group-limited router's expert groups line up with the ranks
    (contiguous placement, ``groups`` a multiple of ``ranks``: each group's experts on one rank): ``top_groups``,
    DeepSeek-V3's node-limited routing. None when they do not line up (a group split over ranks, or hashed)."""
    if groups == 1 or kind != "contiguous" or groups % ranks:
        return None
    return min(top_groups, ranks)
