"""Spec -> Graph lowering and the graph passes, run in order by ``run_pipeline``.

The pipeline's names are imported on first use: the layer kinds (``moec.layers``) import
``moec.passes.builder``, and the pipeline imports the layer kinds, so this package's own
``__init__`` must not import the pipeline when a submodule is loaded.
"""

PIPELINE_NAMES = ("PASS_NAMES", "Compiled", "PassRecord", "PipelineUsageError", "run_pipeline")


def __getattr__(name: str):
    """``moec.passes.run_pipeline`` and the other names of ``moec.passes.pipeline``."""
    if name in PIPELINE_NAMES:
        from moec.passes import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'moec.passes' has no attribute {name!r}")


__all__ = list(PIPELINE_NAMES)
