"""Distributed execution plans: the generated ``parallel.py`` (DeviceMesh, FSDP2)."""

from moec.backends.parallel.plan import ParallelPlan, emit_parallel, parallel_plan

__all__ = ["ParallelPlan", "emit_parallel", "parallel_plan"]
