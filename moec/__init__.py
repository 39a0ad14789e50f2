"""moec: a compiler for Mixture-of-Experts models, from one YAML spec.

Public API (stable names)::

    spec = moec.load_spec("specs/spectral_moe.yaml")   # raises moec.SpecError
"""

from moec.schema import Spec, SpecError, SpecIssue, json_schema, load_spec, load_spec_text

__version__ = "0.1.0"

__all__ = ["Spec", "SpecError", "SpecIssue", "__version__", "json_schema", "load_spec", "load_spec_text"]
