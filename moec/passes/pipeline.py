"""The pass pipeline: Spec -> primitive graph -> fused, annotated graph.

Every pass is a pure function ``Graph -> (Graph, changed)``; this module lists them in
order, times each, runs the verifier after each, records the ops it added and removed,
and skips the ones named in ``disable``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable

from moec.ir.graph import Graph
from moec.ir.verify import verify
from moec.passes.cleanup import cse, dce
from moec.passes.fuse_moe import fuse_moe
from moec.passes.fuse_spectral import fuse_spectral
from moec.passes.lower import lower
from moec.passes.shapes import infer_shapes
from moec.passes.sharding import annotate_sharding
from moec.schema.spec import Spec

Pass = Callable[[Graph], tuple[Graph, bool]]
REQUIRED = ("lower", "infer_shapes")  # later passes need a typed graph


def passes_for(spec: Spec) -> list[tuple[str, Pass]]:
    return [
        ("infer_shapes", infer_shapes),  # fill and check every node's types
        ("fuse_moe", fuse_moe),  # route + dispatch + experts + combine + aux -> one moe node
        ("fuse_spectral", fuse_spectral),  # rfft -> (moe)^L -> irfft -> one spectral_moe node
        ("annotate_sharding", partial(annotate_sharding, spec)),  # placements per mesh axis, pipeline stages
        ("cse", cse),  # merge identical pure nodes
        ("dce", dce),  # drop nodes that reach no output
    ]


PASS_NAMES = ("lower",) + tuple(name for name, _ in passes_for(spec=None))  # the list above is the one source


@dataclass(frozen=True)
class PassRecord:
    name: str
    seconds: float
    changed: bool
    skipped: bool
    added: dict[str, int]
    removed: dict[str, int]
    nodes: int
    graph: Graph  # the graph after this pass (the history, for --dump-ir)


@dataclass(frozen=True)
class Compiled:
    graph: Graph
    log: tuple[PassRecord, ...]

    @property
    def unfused(self) -> Graph:
        """The typed primitive graph, before any fusion."""
        return next(record.graph for record in self.log if record.name == "infer_shapes")


def run_pipeline(spec: Spec, disable: tuple[str, ...] = (), check: bool = True) -> Compiled:
    unknown = [name for name in disable if name not in PASS_NAMES]
    if unknown:
        raise ValueError(f"unknown pass {unknown[0]!r}; passes are: {', '.join(PASS_NAMES)}")
    required = [name for name in disable if name in REQUIRED]
    if required:
        raise ValueError(f"pass {required[0]!r} cannot be disabled: later passes need its output")
    start = time.perf_counter()
    graph = lower(spec)
    if check:
        verify(graph)
    log = [_record("lower", start, Graph(nodes=(), outputs=()), graph, True, False)]
    for name, fn in passes_for(spec):
        start = time.perf_counter()
        if name in disable:
            log.append(_record(name, start, graph, graph, False, True))
            continue
        new, changed = fn(graph)
        if check:
            verify(new)
        log.append(_record(name, start, graph, new, changed, False))
        graph = new
    return Compiled(graph=graph, log=tuple(log))


def _record(name: str, start: float, before: Graph, after: Graph, changed: bool, skipped: bool) -> PassRecord:
    seconds = time.perf_counter() - start
    old, new = Counter(n.op for n in before.nodes), Counter(n.op for n in after.nodes)
    return PassRecord(name, seconds, changed, skipped, dict(new - old), dict(old - new), len(after), after)
