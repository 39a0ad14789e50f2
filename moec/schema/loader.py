"""Safe YAML loading that remembers where every key and value came from.

PyYAML's safe composer builds a node tree that keeps line/column marks; we walk
that tree ourselves (never the full constructor) so that we can
- record a mark for every key path (errors point at ``file:line:col``),
- refuse duplicate keys, merge keys and tags that would construct objects,
- bound the expanded size and depth, which defeats alias ("billion laughs") bombs, and the
  nesting while composing (PyYAML's composer recurses: 500 levels of ``[[[`` would overflow),
- refuse YAML 1.1 base-60 numbers (``1:20`` is 80), control bytes and integers too long to convert,
- read files with a byte limit, refusing devices and FIFOs (``/dev/zero`` has no end).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path as FsPath

import yaml

from moec.schema.errors import SpecError, SpecIssue

MAX_FILE_BYTES = 1 << 20  # 1 MiB: a spec is a page of text, not a data file
MAX_NODES = 100_000  # scalars + collections after alias expansion
MAX_DEPTH = 64


@dataclass(frozen=True)
class Mark:
    """1-based positions of a value and of the key that holds it."""

    line: int
    column: int
    key_line: int
    key_column: int


@dataclass
class LoadedYaml:
    data: object
    marks: dict[tuple, Mark] = field(default_factory=dict)
    file: str = "<spec>"
    text: str = ""  # the document as read, for its sha256 in build provenance
    overrides: tuple = ()  # command-line overrides applied to ``data`` (moec.schema.overrides.Override)

    def locate(self, path: tuple, at_key: bool = False) -> tuple[int, int] | None:
        """Line and column of the deepest prefix of ``path`` that exists in the file."""
        for end in range(len(path), -1, -1):
            mark = self.marks.get(tuple(path[:end]))
            if mark is not None:
                if at_key or end < len(path):
                    return mark.key_line, mark.key_column
                return mark.line, mark.column
        return None


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``) and bounds nesting."""

    file = "<spec>"
    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise SpecError([SpecIssue(f"nesting deeper than {MAX_DEPTH} levels", file=self.file, line=mark.line + 1,
                                           column=mark.column + 1)])
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789"),
)

_SCALAR_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}
_PLAIN_TAGS = _SCALAR_TAGS | {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


def load_yaml_text(text: str, file: str = "<spec>") -> LoadedYaml:
    """Parse one YAML document into plain dicts/lists/scalars plus marks."""
    if len(text.encode("utf-8", errors="replace")) > MAX_FILE_BYTES:
        raise SpecError([SpecIssue(f"file is larger than {MAX_FILE_BYTES} bytes; a spec should be a page of YAML", file=file, line=1, column=1)])
    try:
        loader = _Loader(text)  # the reader checks for unprintable characters here
    except yaml.reader.ReaderError as err:
        raise SpecError([_reader_issue(err, text, file)]) from None
    loader.file = file
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as err:
        raise SpecError([_syntax_issue(err, file)]) from None
    except yaml.reader.ReaderError as err:
        raise SpecError([_reader_issue(err, text, file)]) from None
    except yaml.YAMLError as err:
        raise SpecError([SpecIssue(f"YAML error: {err}", file=file, line=1, column=1)]) from None
    finally:
        loader.dispose()
    if root is None:
        raise SpecError([SpecIssue("the file is empty; expected a mapping with 'version' and 'model'", file=file, line=1, column=1)])
    walker = _Walker(loader, file)
    data = walker.walk(root, (), None, depth=0)
    if walker.issues:
        raise SpecError(walker.issues)
    return LoadedYaml(data=data, marks=walker.marks, file=file, text=text)


def load_yaml_file(path: str | FsPath) -> LoadedYaml:
    file = str(path)
    try:
        text = _read_spec_bytes(FsPath(path), file).decode("utf-8")
    except FileNotFoundError:
        raise SpecError([SpecIssue("no such file", file=file)]) from None
    except IsADirectoryError:
        raise SpecError([SpecIssue("is a directory, not a spec file", file=file)]) from None
    except UnicodeDecodeError as err:
        raise SpecError([SpecIssue(f"not UTF-8 text ({err.reason} at byte {err.start})", file=file)]) from None
    except OSError as err:
        raise SpecError([SpecIssue(f"cannot read: {err.strerror}", file=file)]) from None
    return load_yaml_text(text, file=file)


def _read_spec_bytes(path: FsPath, file: str) -> bytes:
    """At most MAX_FILE_BYTES + 1 bytes of a regular file (``st_size`` is not trusted: /dev/zero has 0)."""
    if stat.S_ISDIR(path.stat().st_mode):
        raise IsADirectoryError
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO must not wait for a writer
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecError([SpecIssue("not a regular file (a device, FIFO or socket); a spec is a YAML file", file=file)])
        chunks, total = [], 0
        while total <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > MAX_FILE_BYTES:
        raise SpecError([SpecIssue(f"file is larger than the {MAX_FILE_BYTES}-byte limit for a spec", file=file)])
    return b"".join(chunks)


def _reader_issue(err: yaml.reader.ReaderError, text: str, file: str) -> SpecIssue:
    before = text[: err.position]
    line, column = before.count("\n") + 1, err.position - (before.rfind("\n") + 1) + 1
    char = err.character if isinstance(err.character, str) else chr(err.character)
    return SpecIssue(f"control character U+{ord(char):04X} is not allowed in a spec (YAML allows only printable text)",
                     file=file, line=line, column=column)


def _syntax_issue(err: yaml.MarkedYAMLError, file: str) -> SpecIssue:
    mark = err.problem_mark or err.context_mark
    problem = " ".join(part for part in (err.context, err.problem) if part)
    line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    return SpecIssue(f"YAML syntax error: {problem}", file=file, line=line, column=column)


class _Walker:
    def __init__(self, loader: _Loader, file: str):
        self.loader = loader
        self.file = file
        self.marks: dict[tuple, Mark] = {}
        self.issues: list[SpecIssue] = []
        self.count = 0

    def walk(self, node: yaml.Node, path: tuple, key_node: yaml.Node | None, depth: int) -> object:
        self.count += 1
        if self.count > MAX_NODES or depth > MAX_DEPTH:
            # One message and stop: this is an alias bomb or a recursive alias.
            limit = f"more than {MAX_NODES} values" if self.count > MAX_NODES else f"nesting deeper than {MAX_DEPTH}"
            raise SpecError([self._issue(node, f"document expands to {limit} (alias bomb or recursive alias?)")])
        key_mark = (key_node or node).start_mark
        self.marks[path] = Mark(node.start_mark.line + 1, node.start_mark.column + 1, key_mark.line + 1, key_mark.column + 1)
        if node.tag not in _PLAIN_TAGS:
            self.issues.append(self._issue(node, f"YAML tag '{node.tag}' is not allowed in a spec"))
            return None
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            return [self.walk(item, path + (i,), None, depth + 1) for i, item in enumerate(node.value)]
        if node.tag not in _SCALAR_TAGS:
            self.issues.append(self._issue(node, f"YAML tag '{node.tag}' is not allowed in a spec"))
            return None
        return self._scalar(node, path)

    def _scalar(self, node: yaml.ScalarNode, path: tuple) -> object:
        numeric = node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
        if numeric and node.style is None and ":" in node.value:
            try:
                reads_as = f" (it would read as {self.loader.construct_object(node)})"
            except ValueError:
                reads_as = ""
            self.issues.append(self._issue(node, f"'{node.value}' is a YAML 1.1 base-60 number{reads_as}; write the number, "
                                                 "or quote it for a string", path))
            return None
        try:
            return self.loader.construct_object(node, deep=True)
        except ValueError:  # Python refuses int() of more than 4300 digits
            digits = sum(ch.isdigit() for ch in node.value)
            self.issues.append(self._issue(node, f"a number of {digits} digits is too long to read", path))
            return None

    def _mapping(self, node: yaml.MappingNode, path: tuple, depth: int) -> dict:
        result: dict = {}
        first_seen: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.issues.append(self._issue(key_node, "YAML merge keys ('<<') are not supported; put an anchor on the whole value instead"))
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _SCALAR_TAGS:
                self.issues.append(self._issue(key_node, "mapping keys must be plain scalars"))
                continue
            key = self._scalar(key_node, path)
            if key in first_seen:
                self.issues.append(self._issue(key_node, f"duplicate key '{key}' (first defined at line {first_seen[key]})", path + (key,)))
                continue
            first_seen[key] = key_node.start_mark.line + 1
            result[key] = self.walk(value_node, path + (key,), key_node, depth + 1)
        return result

    def _issue(self, node: yaml.Node, message: str, path: tuple = ()) -> SpecIssue:
        mark = node.start_mark
        return SpecIssue(message, path=path, file=self.file, line=mark.line + 1, column=mark.column + 1)
