"""A spec that failed validation, kept as far as it validates, so that checks across sections still run.

Without this, ``train.seq_len > model.max_seq_len`` would only be reported after every model
error is fixed: one more edit-validate round per section. :func:`partial_spec` validates each
part on its own (strictly, with the field's constraints) and puts :data:`UNKNOWN` where a part
fails; :func:`partial_findings` runs the cross-section checks that read plain, unresolved fields
on it. Touching ``UNKNOWN`` in any way (compare, format, iterate, do arithmetic) raises
:class:`_Unknown`, which ends that check quietly: a check never reports from a value that did
not validate, and defaults that ``resolve`` would fill stay ``None`` (any use raises TypeError).
"""

from __future__ import annotations

import typing
from typing import Annotated

from pydantic import BaseModel, TypeAdapter, ValidationError

_MISSING = object()


class _Unknown(Exception):
    """A check touched a value that failed validation."""


class _UnknownValue:
    def _stop(self, *args, **kwargs):
        raise _Unknown

    __bool__ = __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __hash__ = _stop
    __iter__ = __len__ = __contains__ = __getitem__ = __format__ = __str__ = __int__ = __float__ = __index__ = _stop
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _stop
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __neg__ = _stop

    def __getattr__(self, name):
        raise _Unknown

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _UnknownValue()


def partial_spec(data: object):
    """The Spec from ``data`` with every part that does not validate replaced by UNKNOWN (not resolved)."""
    from moec.schema.spec import Spec

    return _partial(Spec, data)


def _partial(tp, value):
    try:
        return TypeAdapter(tp).validate_python(value, strict=True)
    except ValidationError as err:
        errors = err.errors()
    except Exception:  # a model validator's own error type, or a type TypeAdapter cannot build
        return UNKNOWN
    inner = _strip(tp)
    if isinstance(inner, type) and issubclass(inner, BaseModel) and isinstance(value, dict):
        return _partial_model(inner, value, _refused_together(errors))
    origin = typing.get_origin(inner)
    if origin is typing.Union and isinstance(value, dict):
        member = _tagged_member(inner, value.get("kind"))
        return UNKNOWN if member is None else _partial(member, value)
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(inner)
        return [_partial(item, v) for v in value]
    return UNKNOWN


def _refused_together(errors: list[dict]) -> set[str]:
    """Fields a model's own validator refused in combination (``grad_accum`` must divide ``batch``):
    each is valid alone, so they must be marked UNKNOWN by name, or a check would report them again."""
    return {str(e["ctx"]["field"]).split(".")[0] for e in errors if e["type"] == "moec_field" and not e["loc"]}


def _partial_model(cls: type[BaseModel], value: dict, refused: set[str]):
    fields = {}
    for name, info in cls.model_fields.items():
        given = value.get(info.alias or name, _MISSING)  # the spec's spelling (checkpoint.async)
        if name in refused:
            fields[name] = UNKNOWN
        elif given is not _MISSING:
            annotated = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            fields[name] = _partial(annotated, given)
        elif info.is_required():
            fields[name] = UNKNOWN
        else:
            fields[name] = info.get_default(call_default_factory=True)
    return cls.model_construct(**fields)


def _strip(tp):
    """Without ``Annotated`` and without ``| None``."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")):
        members = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(members) == 1:
            return _strip(members[0])
        return typing.Union[tuple(_strip(m) for m in members)]
    return tp


def _tagged_member(union, kind):
    for member in typing.get_args(union):
        field = getattr(member, "model_fields", {}).get("kind")
        if field is not None and kind in typing.get_args(field.annotation):
            return member
    return None


def partial_findings(spec, checks) -> list[tuple[tuple, str]]:
    """Findings of ``checks`` on a partial spec; a check stops at the first value it cannot trust."""
    findings = []
    for check in checks:
        try:
            for finding in check(spec):
                findings.append(finding)
        except (_Unknown, TypeError, AttributeError, KeyError, IndexError, ValueError, ZeroDivisionError):
            continue  # what it yielded before rested on validated values only
    return findings
