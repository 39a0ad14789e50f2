"""moec: a compiler for Mixture-of-Experts models, from one YAML spec.

Public API (stable names)::

    spec = moec.load_spec("specs/spectral_moe.yaml")   # raises moec.SpecError
    program = moec.compile_spec(spec)                   # .graph, .source (model.py), .manifest
    model = moec.build_model(spec, device="cpu")        # the generated nn.Module, weights from the seed
    ref = moec.reference_model(spec)                    # eager interpreter of the unfused graph
    model, spec = moec.load_trained("runs/x")           # a run's newest valid checkpoint, eval mode
    out = ref(*ref.example_inputs(batch=2, seq=64))     # .output and .aux_loss
"""

from moec.version import __version__

# Everything is imported on first use: moec.schema loads pydantic, moec.compile loads torch, and
# `moec --help` (moec.cli, a subpackage: importing it runs this file) must stay instant.
SCHEMA_NAMES = ("Spec", "SpecError", "SpecIssue", "json_schema", "load_spec", "load_spec_text")


def __getattr__(name: str):
    """``moec.load_spec`` and the other schema names, imported from moec.schema on first use."""
    if name in SCHEMA_NAMES:
        from moec import schema

        return getattr(schema, name)
    raise AttributeError(f"module 'moec' has no attribute {name!r}")


def compile_spec(spec, disable: tuple[str, ...] = ()):
    """Spec -> Program with ``.graph`` (fused IR), ``.source`` (model.py) and ``.manifest``."""
    from moec.compile import compile_spec as compile_

    return compile_(spec, disable=disable)


def build_model(spec, device="cpu", dtype=None, weights=None):
    """The generated ``nn.Module``, weights from the spec seed or a ``weights`` safetensors file
    (``moec import hf``); ``device="meta"`` allocates nothing."""
    from moec.compile import build_model as build

    return build(spec, device=device, dtype=dtype, weights=weights)


def reference_model(spec, fused: bool = False, device="cpu"):
    """The eager reference interpreter of ``spec`` as an ``nn.Module`` (imports torch)."""
    from moec.compile import reference_model as build

    return build(spec, fused=fused, device=device)


def load_trained(path, device="cpu"):
    """``(model, spec)`` from a run directory (its newest checkpoint that verifies) or a checkpoint
    directory: the generated model with the trained weights, in eval mode."""
    from moec.serve.load import load_trained as load

    return load(path, device=device)


__all__ = ["Spec", "SpecError", "SpecIssue", "__version__", "build_model", "compile_spec", "json_schema", "load_spec", "load_spec_text",
           "load_trained", "reference_model"]
