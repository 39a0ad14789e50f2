"""Side-by-side timing of MoE layers: moec's kernels against dense GEMMs, HF transformers'
``grouped_mm`` experts and a per-expert loop, in one process, interleaved (``moec bench``)."""
