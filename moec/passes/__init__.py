"""Spec -> Graph lowering and the graph passes, run in order by ``run_pipeline``."""

from moec.passes.pipeline import PASS_NAMES, Compiled, PassRecord, PipelineUsageError, run_pipeline

__all__ = ["PASS_NAMES", "Compiled", "PassRecord", "PipelineUsageError", "run_pipeline"]
