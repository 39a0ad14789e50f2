"""Spec errors that point at the file, line and column they come from.

Every problem found in a spec becomes one :class:`SpecIssue`; a :class:`SpecError`
carries all of them, so one run of ``moec validate`` reports everything at once.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence

Path = tuple  # a key path into the spec: ("model", "blocks", 1, "layers", 0, "top_k")


def format_path(path: Sequence[str | int]) -> str:
    """``("model", "blocks", 1, "top_k")`` -> ``model.blocks[1].top_k``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "<root>"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec, located by key path and (when known) line and column."""

    message: str
    path: Path = ()
    file: str = "<spec>"
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.column or 1}"
        key = f" {format_path(self.path)}:" if self.path else ""
        return f"{where}:{key} {self.message}"


class SpecError(ValueError):
    """A spec that cannot be loaded. ``str(err)`` is one line per issue."""

    def __init__(self, issues: Sequence[SpecIssue]):
        assert issues, "a SpecError needs at least one issue"
        self.issues = tuple(sorted(issues, key=_issue_order))
        super().__init__("\n".join(str(issue) for issue in self.issues))


def _issue_order(issue: SpecIssue) -> tuple:
    return (issue.file, issue.line or 0, issue.column or 0, issue.message)
