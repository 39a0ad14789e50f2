"""The pass pipeline: Spec -> primitive graph -> fused, annotated graph.

Every pass is a pure function ``Graph -> (Graph, changed)``; this module lists them in
order with what each requires (passes that must have run first) and what it removes (ops
that must be gone after it), times each, runs the verifier and that stage rule after each,
records the ops it added and removed, and skips the ones named in ``disable`` and those
whose requirements were skipped (``--disable-pass fuse_moe`` skips ``fuse_spectral`` too).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable

from moec.ir.graph import Graph
from moec.ir.verify import VerifyError, verify
from moec.passes.cleanup import cse, dce
from moec.passes.fuse_moe import fuse_moe
from moec.passes.fuse_spectral import fuse_spectral
from moec.passes.lower import lower
from moec.passes.shapes import infer_shapes
from moec.passes.sharding import annotate_sharding
from moec.schema.spec import Spec

Pass = Callable[[Graph], tuple[Graph, bool]]


class PipelineUsageError(ValueError):
    """A ``disable`` list the pipeline cannot honour (an unknown or a required pass): a usage error."""


@dataclass(frozen=True)
class PassDef:
    name: str
    fn: Pass
    requires: tuple[str, ...] = ()  # passes that must have run before this one (else it is skipped too)
    removes: tuple[str, ...] = ()  # ops that no longer exist after it: the verifier's rule for this stage


# Ops that only exist inside an unfused MoE / spectral MoE.
MOE_PRIMITIVES = ("topk", "dispatch", "expert_ffn", "combine")
SPECTRAL_PRIMITIVES = ("rfft", "irfft")


def passes_for(spec: Spec) -> list[PassDef]:
    return [
        PassDef("infer_shapes", infer_shapes),  # fill and check every node's types
        PassDef("fuse_moe", fuse_moe, ("infer_shapes",), MOE_PRIMITIVES),  # route + dispatch + experts + combine + aux -> one moe node
        PassDef("fuse_spectral", fuse_spectral, ("fuse_moe",), SPECTRAL_PRIMITIVES),  # rfft -> (moe)^L -> irfft -> one node
        PassDef("annotate_sharding", partial(annotate_sharding, spec), ("infer_shapes",)),  # placements per mesh axis, stages
        PassDef("cse", cse),  # merge identical pure nodes
        PassDef("dce", dce),  # drop nodes that reach no output
    ]


PASS_NAMES = ("lower",) + tuple(p.name for p in passes_for(spec=None))  # the list above is the one source
REQUIRED = ("lower", "infer_shapes")  # later passes need a typed graph


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
        raise PipelineUsageError(f"unknown pass {unknown[0]!r}; passes are: {', '.join(PASS_NAMES)}")
    required = [name for name in disable if name in REQUIRED]
    if required:
        raise PipelineUsageError(f"pass {required[0]!r} cannot be disabled: later passes need its output")
    start = time.perf_counter()
    graph = lower(spec)
    if check:
        verify(graph)
    log = [_record("lower", start, Graph(nodes=(), outputs=()), graph, True, False)]
    ran = {"lower"}
    for step in passes_for(spec):
        start = time.perf_counter()
        if step.name in disable or not ran.issuperset(step.requires):
            log.append(_record(step.name, start, graph, graph, False, True))
            continue
        new, changed = step.fn(graph)
        if check:
            verify(new)
            _check_removed(step, new)
        log.append(_record(step.name, start, graph, new, changed, False))
        ran.add(step.name)
        graph = new
    return Compiled(graph=graph, log=tuple(log))


def _check_removed(step: PassDef, graph: Graph) -> None:
    left = sorted({node.op for node in graph.nodes} & set(step.removes))
    if left:
        raise VerifyError(f"after {step.name}: {', '.join(left)} nodes remain (it should have fused them): a compiler bug")


def _record(name: str, start: float, before: Graph, after: Graph, changed: bool, skipped: bool) -> PassRecord:
    seconds = time.perf_counter() - start
    old, new = Counter(n.op for n in before.nodes), Counter(n.op for n in after.nodes)
    return PassRecord(name, seconds, changed, skipped, dict(new - old), dict(old - new), len(after), after)
