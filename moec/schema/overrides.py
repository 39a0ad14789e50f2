"""Command-line overrides: ``moec train SPEC train.steps=50 model.blocks[0].layers[1].experts=8``.

Each override is ``PATH=VALUE``: ``PATH`` is a dotted key path with list indices (the form
errors print), ``VALUE`` is read as YAML by the spec's own loader (``8``, ``1e-3``, ``true``,
``null``, ``[0.9, 0.99]``, ``{kind: mlp}``). Overrides are applied to the YAML data before
validation, in order, so the same schema checks them; an issue at or under an overridden key
is reported as ``command line: PATH: message`` instead of a line of the file.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace

from moec.schema.errors import SpecError, SpecIssue, format_path
from moec.schema.loader import LoadedYaml, load_yaml_text

COMMAND_LINE = "command line"
_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")
_INDEX = re.compile(r"\[(\d+)\]")
_LOOKS_LIKE_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\[\]]*=")


@dataclass(frozen=True)
class Override:
    text: str  # as typed, for the manifest and checkpoints: "train.steps=50"
    path: tuple  # ("train", "steps")
    value: object


def is_override(arg: str) -> bool:
    """Whether a command-line word is written as ``PATH=VALUE`` (spec files never start that way)."""
    return bool(_LOOKS_LIKE_OVERRIDE.match(arg))


def parse_overrides(args) -> tuple[Override, ...]:
    """Every ``PATH=VALUE`` word parsed; all malformed ones reported at once as a :class:`SpecError`."""
    parsed, issues = [], []
    for arg in args:
        try:
            parsed.append(_parse(arg))
        except _Bad as bad:
            issues.append(SpecIssue(str(bad), path=bad.path, file=COMMAND_LINE))
    if issues:
        raise SpecError(issues)
    return tuple(parsed)


class _Bad(ValueError):
    def __init__(self, message: str, path: tuple = ()):
        super().__init__(message)
        self.path = path


def _parse(arg: str) -> Override:
    key, sep, value_text = arg.partition("=")
    if not sep:
        raise _Bad(f"{arg!r} is not an override (write KEY=VALUE, e.g. train.steps=50); "
                   "to resume from a checkpoint use --resume or --resume-from PATH")
    path = parse_path(key)
    if not value_text.strip():
        raise _Bad("needs a value after '=' (write null for null, or '' for an empty string)", path)
    try:
        value = load_yaml_text(value_text, file=COMMAND_LINE).data
    except SpecError as err:
        reason = err.issues[0].message
        raise _Bad(f"cannot read the value {value_text!r}: {reason}", path) from None
    return Override(text=f"{format_path(path)}={value_text}", path=path, value=value)


def parse_path(key: str) -> tuple:
    """``model.blocks[0].layers[1].experts`` -> ``("model", "blocks", 0, "layers", 1, "experts")``."""
    path: list = []
    for part in key.split("."):
        match = _KEY.match(part)
        if not match:
            raise _Bad(f"{key!r} is not a key path (write names joined by '.', with [N] for list items, "
                       "e.g. model.blocks[0].layers[1].experts)")
        path.append(match.group(1))
        path += [int(index) for index in _INDEX.findall(match.group(2))]
    return tuple(path)


def apply_overrides(loaded: LoadedYaml, overrides: tuple[Override, ...]) -> LoadedYaml:
    """A copy of the loaded YAML with the overrides set, in order; a path that cannot be set is a SpecError."""
    if not overrides:
        return loaded
    data = copy.deepcopy(loaded.data)
    issues = []
    for override in overrides:
        try:
            data = _set(data, override.path, override.value)
        except _Bad as bad:
            issues.append(SpecIssue(str(bad), path=override.path, file=COMMAND_LINE))
    if issues:
        raise SpecError(issues)
    return replace(loaded, data=data, overrides=loaded.overrides + tuple(overrides))


def _set(data, path: tuple, value):
    """``data`` with ``path`` set to ``value``: mappings on the way are created, list items must exist."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        if not isinstance(data, list):
            raise _Bad(f"[{head}]: {_what(data)} is not a list")
        if head >= len(data):
            raise _Bad(f"index {head} is out of range: the spec has {len(data)} item(s) here")
        data[head] = _set(data[head], rest, value)
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _Bad(f"cannot set '{head}' inside {_what(data)}")
    data[head] = _set(data.get(head), rest, value)
    return data


def _what(value) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"the value {value!r}"


def from_command_line(overrides: tuple[Override, ...], path: tuple) -> bool:
    """Whether ``path`` is an overridden key or lies under one."""
    return any(path[:len(o.path)] == o.path for o in overrides)
