"""Running a compiled model: data, training loop, checkpoints, metrics, plots."""
