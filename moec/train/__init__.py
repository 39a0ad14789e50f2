"""Training a compiled model: the loop (``Trainer``), the pipeline-parallel step, the optimizer and its schedule, the fit check."""
