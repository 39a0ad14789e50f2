"""``load_spec``: YAML text -> validated, resolved, frozen :class:`Spec`, or one SpecError with every issue."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path as FsPath

from pydantic import BaseModel, ValidationError

from moec.schema.checks import checks_on_partial_spec, run_checks
from moec.schema.errors import SpecError, SpecIssue, did_you_mean
from moec.schema.loader import LoadedYaml, load_yaml_file, load_yaml_text
from moec.schema.overrides import COMMAND_LINE, apply_overrides, from_command_line, parse_overrides
from moec.schema.partial import partial_findings, partial_spec
from moec.schema.spec import Spec, resolve


def load_spec(path: str | FsPath, overrides=()) -> Spec:
    """Load, validate and resolve the spec at ``path``; raises :class:`SpecError`.

    ``overrides``: ``PATH=VALUE`` strings (``train.steps=50``), applied before validation.
    """
    return validate_loaded(_with_overrides(load_yaml_file(path), overrides))


def load_spec_text(text: str, file: str = "<spec>", overrides=()) -> Spec:
    return validate_loaded(_with_overrides(load_yaml_text(text, file=file), overrides))


def _with_overrides(loaded: LoadedYaml, overrides) -> LoadedYaml:
    return apply_overrides(loaded, parse_overrides(overrides)) if overrides else loaded


def validate_loaded(loaded: LoadedYaml) -> Spec:
    if not isinstance(loaded.data, dict):
        kind = type(loaded.data).__name__
        raise SpecError([SpecIssue(f"a spec must be a mapping with 'version', 'name', 'model' and 'train', got a {kind}", file=loaded.file, line=1, column=1)])
    try:
        spec = resolve(Spec.model_validate(loaded.data))
    except ValidationError as err:
        issues = [_issue_from_pydantic(error, loaded) for error in err.errors()]
        raise SpecError(issues + _cross_section_issues(loaded, issues)) from None
    findings = run_checks(spec)
    if findings:
        raise SpecError([_located(loaded, path, message) for path, message in findings])
    return spec.attach_source(loaded)


def _cross_section_issues(loaded: LoadedYaml, known: list[SpecIssue]) -> list[SpecIssue]:
    """Cross-section findings on what did validate, so they are not hidden behind other sections' errors."""
    try:
        findings = partial_findings(partial_spec(loaded.data), checks_on_partial_spec())
    except Exception:  # best effort on a broken spec: the schema's own issues are reported regardless
        return []
    reported = {issue.path for issue in known}
    return [_located(loaded, path, message) for path, message in findings if path not in reported]


def _located(loaded: LoadedYaml, path: tuple, message: str, at_key: bool = False) -> SpecIssue:
    if from_command_line(loaded.overrides, path):
        return SpecIssue(message, path=path, file=COMMAND_LINE)
    where = loaded.locate(path, at_key=at_key) or (None, None)
    return SpecIssue(message, path=path, file=loaded.file, line=where[0], column=where[1])


def _issue_from_pydantic(error: dict, loaded: LoadedYaml) -> SpecIssue:
    loc = tuple(error["loc"])
    if error["type"] == "moec_field":
        loc += tuple(int(part) if part.isdigit() else part for part in error["ctx"]["field"].split("."))
    path, at_key = _data_path(loc, loaded.data)
    if error["type"] in ("extra_forbidden", "missing"):
        at_key = True
    if error["type"] == "union_tag_invalid":
        path += ("kind",)
    return _located(loaded, path, _message(error, loc), at_key=at_key)


def _data_path(loc: tuple, data: object) -> tuple[tuple, bool]:
    """Map a pydantic location to a key path in the YAML data.

    Pydantic inserts discriminator tags (``'attention'``) and ``'[key]'`` markers into
    locations; neither is a key in the file, so both are dropped here.
    """
    path: list = []
    cursor = data
    at_key = False
    for part in loc:
        if part == "[key]":
            at_key = True
        elif isinstance(cursor, dict) and part in cursor:
            path.append(part)
            cursor = cursor[part]
        elif isinstance(cursor, list) and isinstance(part, int) and 0 <= part < len(cursor):
            path.append(part)
            cursor = cursor[part]
        elif isinstance(cursor, dict) and cursor.get("kind") == part:
            continue  # a discriminator tag
        elif part in ANNEALABLE_TAGS:
            continue  # the tag of a number-or-schedule value (moec.schema.model.annealable)
        else:
            path.append(part)  # a key that is missing from the file
            cursor = None
    return tuple(path), at_key


_UNIONS = (typing.Union, types.UnionType)
ANNEALABLE_TAGS = ("value", "anneal")
_QUOTED = re.compile(r"'([^']*)'")


def _message(error: dict, loc: tuple) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "moec_field":
        return error["msg"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        return f"unknown key '{loc[-1]}'" + did_you_mean(str(loc[-1]), allowed) + _listing("allowed keys", allowed)
    if kind == "literal_error":
        expected = _QUOTED.findall(ctx.get("expected", ""))
        return f"must be one of {ctx.get('expected')}, got {value!r}" + did_you_mean(str(value), expected)
    if kind == "union_tag_invalid":
        expected = _QUOTED.findall(ctx.get("expected_tags", ""))
        return f"unknown kind '{ctx.get('tag')}'; expected one of {ctx.get('expected_tags')}" + did_you_mean(str(ctx.get("tag")), expected)
    if kind == "union_tag_not_found":
        return "needs a 'kind' key to say which variant this is"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit}, got {value!r}"
    types = {
        "int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string",
        "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
        "model_attributes_type": "a mapping", "int_from_float": "an integer",
    }
    if kind in types:
        return f"must be {types[kind]}, got {_describe(value)}"
    if kind in ("too_short", "too_long"):
        bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        word = "at least" if kind == "too_short" else "at most"
        return f"must have {word} {bound} item(s), got {ctx.get('actual_length')}"
    if kind == "string_pattern_mismatch":
        if ctx.get("pattern", "").startswith("^[A-Za-z]["):
            return f"must be an identifier (a letter, then letters, digits or _), got {value!r}"
        return f"must be printable text on one line, got {value!r}"
    if kind == "value_error":
        return error["msg"].removeprefix("Value error, ")
    return error["msg"][0].lower() + error["msg"][1:]


def _describe(value: object) -> str:
    names = {str: "text", bool: "a boolean", int: "an integer", float: "a number", list: "a list", dict: "a mapping", type(None): "null"}
    shown = repr(value) if not isinstance(value, (dict, list)) else ""
    return f"{names.get(type(value), type(value).__name__)} {shown}".strip()


def _listing(label: str, names: list[str]) -> str:
    return f" ({label}: {', '.join(names)})" if names and len(names) <= 16 else ""


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the model at a pydantic location (following tags through unions)."""
    tp: object = Spec
    for part in loc:
        tp = _step(_unwrap(tp), part)
        if tp is None:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [info.alias or name for name, info in tp.model_fields.items()]  # as a spec spells them (async)
    return []


def _unwrap(tp: object) -> object:
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in _UNIONS:
            members = [arg for arg in typing.get_args(tp) if arg is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _step(tp: object, part: object) -> object:
    origin = typing.get_origin(tp)
    if origin in _UNIONS:
        for member in typing.get_args(tp):
            fields = getattr(member, "model_fields", {})
            kind = fields.get("kind")
            if kind is not None and part in typing.get_args(kind.annotation):
                return member
        return None
    if origin in (list, tuple):
        return typing.get_args(tp)[0] if isinstance(part, int) else None
    if origin is dict:
        return typing.get_args(tp)[1]
    if isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
        return tp.model_fields[part].annotation
    return None
