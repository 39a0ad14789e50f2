"""Pipeline stages: consecutive blocks per stage, balanced by forward FLOPs per token.

Stage 0 also runs what comes before the first block (embeddings), the last stage what comes after
the last one (final norm, head: for a large vocabulary worth a block or two), so their costs join
the first and the last block's. The split minimises the costliest stage (the pipeline's pace): a
binary search on that cost, each candidate checked by packing blocks greedily from the left
(O(blocks) per check), then the cut that fills every stage, packed from the last block back.
"""

from __future__ import annotations

from moec.ir.graph import Graph
from moec.passes.flops import block_flops

SLACK = 1 + 1e-9  # packing backwards adds the same blocks in another order: the sums differ in the last bits


def stage_split(spec, graph: Graph, stages: int | None = None) -> tuple[tuple[int, int], ...]:
    """``(first, last)`` block of each stage (inclusive): one stage per rank of the spec's pipeline axis, or
    ``stages`` (interleaved 1F1B runs several virtual stages per rank)."""
    stages = stages or spec.mesh.axes[spec.sharding.pipeline.axis]
    pre, per_block, post = block_flops(spec, graph, spec.model.num_layers)
    costs = list(per_block)
    costs[0] += pre
    costs[-1] += post
    return balanced_split(costs, stages)


def balanced_split(costs: list[float], stages: int) -> tuple[tuple[int, int], ...]:
    """Consecutive, non-empty groups of ``costs`` minimising the largest group's sum."""
    assert 1 <= stages <= len(costs), f"{stages} stages for {len(costs)} blocks"
    low, high = max(costs), sum(costs)
    for _ in range(100):  # floats: stop when the interval no longer shrinks
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (low, middle) if _stages_needed(costs, middle) <= stages else (middle, high)
    # Pack from the last block back: where stages cannot all be equal, the first ones get less. Under
    # 1F1B the first stage keeps the most microbatches' activations alive.
    backwards = _cut(costs[::-1], stages, high)
    last = len(costs) - 1
    return tuple((last - end, last - start) for start, end in reversed(backwards))


def _stages_needed(costs: list[float], limit: float) -> int:
    count, load = 1, 0.0
    for cost in costs:
        if load + cost > limit:
            count, load = count + 1, 0.0
        load += cost
    return count


def _cut(costs: list[float], stages: int, limit: float) -> tuple[tuple[int, int], ...]:
    """Greedy packing under ``limit``, cutting early where the blocks left must fill the stages left."""
    groups, start, load = [], 0, 0.0
    for index, cost in enumerate(costs):
        left_blocks, left_stages = len(costs) - index, stages - len(groups)
        full = load + cost > limit * SLACK and len(groups) < stages - 1
        if index > start and (full or left_blocks < left_stages):
            groups.append((start, index - 1))
            start, load = index, 0.0
        load += cost
    groups.append((start, len(costs) - 1))
    assert len(groups) == stages, (groups, stages)
    return tuple(groups)
