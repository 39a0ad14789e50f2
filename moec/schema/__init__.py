"""The spec language: pydantic models, YAML loading with line marks, cross-section checks.

The spec's models are imported on first use: a layer kind's spec (``moec/layers/<kind>/spec.py``)
imports ``moec.schema.base``, and ``moec.schema.model`` imports the layer kinds, so loading a
submodule of this package must not load the whole spec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moec.schema.errors import SpecError, SpecIssue

if TYPE_CHECKING:
    from moec.schema.spec import Spec

SPEC_NAMES = ("SCHEMA_VERSION", "Spec")
LOADER_NAMES = ("load_spec", "load_spec_text")


def __getattr__(name: str):
    """``moec.schema.Spec``, ``load_spec`` and the other names of ``moec.schema.spec`` / ``validate``."""
    if name in SPEC_NAMES:
        from moec.schema import spec

        return getattr(spec, name)
    if name in LOADER_NAMES:
        from moec.schema import validate

        return getattr(validate, name)
    raise AttributeError(f"module 'moec.schema' has no attribute {name!r}")


def resolved_yaml(spec: Spec) -> str:
    """The spec with every default filled in, as YAML (``moec validate --resolved``)."""
    import yaml

    return yaml.safe_dump(_kind_first(spec.model_dump(mode="json")), sort_keys=False)


def _kind_first(value):
    """Put ``kind`` and ``name`` first in every variant mapping, where a reader looks for them."""
    if isinstance(value, dict):
        head = {key: value[key] for key in ("kind", "name") if key in value and "kind" in value}
        return head | {key: _kind_first(item) for key, item in value.items() if key not in head}
    if isinstance(value, list):
        return [_kind_first(item) for item in value]
    return value


def json_schema() -> dict:
    """The JSON Schema of a spec, for editors (see docs/editor.md)."""
    from moec.schema.spec import SCHEMA_VERSION, Spec

    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"moec-spec-v{SCHEMA_VERSION}"
    return schema


__all__ = ["SCHEMA_VERSION", "Spec", "SpecError", "SpecIssue", "json_schema", "load_spec", "load_spec_text", "resolved_yaml"]
