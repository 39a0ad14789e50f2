"""The reference interpreter: the eager ground truth for every backend."""

from __future__ import annotations

from moec.backends.reference.interpreter import ReferenceModel, init_parameter, parameter_seed


def reference_model(spec, fused: bool = False, device="cpu", disable: tuple[str, ...] = ()) -> ReferenceModel:
    """An ``nn.Module`` interpreting the spec's graph: unfused (default) or after all passes."""
    from moec.passes import run_pipeline

    compiled = run_pipeline(spec, disable=disable)
    graph = compiled.graph if fused else compiled.unfused
    return ReferenceModel(graph, seed=spec.train.seed, device=device)


__all__ = ["ReferenceModel", "init_parameter", "parameter_seed", "reference_model"]
