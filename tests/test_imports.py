"""moec's import graph, read with ``ast``: no import cycle among moec's modules and no private name
(``_x``, not a dunder) taken from another moec module.

Every import counts, at module level or inside a function: an import moved into a function to
break a cycle still makes one. A private name counts when it is imported (``from m import _x``)
or read as an attribute of an imported moec module or of a name imported from one
(``from moec import m; m._x``, ``from moec.m import C; C._x``). Imports under
``if TYPE_CHECKING:`` never run and count for neither. ``KNOWN`` is empty: an offender may be
listed there only inside the folders named in it, and the test fails when an entry is no
longer needed, so that the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moec"

# The folders the emitter rewrite (issue 24) owns: only their files may appear in KNOWN.
REWRITE_IN_PROGRESS = ("moec/backends/torch/", "moec/passes/", "moec/ir/", "moec/moe/", "moec/backends/output.py",
                       "moec/compile.py")

# emitter rewrite in progress: imports in the folders above that close a cycle (importer, imported)
# or take a private name (importer, imported, name). Nothing outside those folders may be listed.
# Each listed edge is the import inside a function that closes its cycle.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(importer: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute dotted name of ``from <level dots><target> import ...`` in ``importer``."""
    if level == 0:
        return target or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports(name: str, path: Path, known: dict[str, Path]):
    """(imported module, private names taken from it, line) for each import in the file, and the
    attribute reads of private names on what was imported from moec (``ckpt._x``, ``TextBytes._read``)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    aliases: dict[str, str] = {}  # local name -> moec module it is bound to
    found = []
    typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block) for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run: they close no cycle
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "moec":
                    continue
                found.append((alias.name, [], node.lineno))
                if alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = resolve(name, is_package, node.level, node.module)
            if source.split(".")[0] != "moec":
                continue
            private = []
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in known:  # `from pkg import module`: an edge to the module itself
                    found.append((submodule, [alias.name] if is_private(alias.name) else [], node.lineno))
                    aliases[alias.asname or alias.name] = submodule
                else:
                    if is_private(alias.name):
                        private.append(alias.name)
                    aliases[alias.asname or alias.name] = source  # a class or function: X._y is source's private name
            if any(f"{source}.{a.name}" not in known for a in node.names):
                found.append((source, private, node.lineno))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and is_private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in aliases):
            found.append((aliases[node.value.id], [node.attr], node.lineno))
    return found


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def graph():
    known = modules()
    edges: dict[str, dict[str, int]] = {m: {} for m in known}
    private = {}
    for name, path in known.items():
        for target, names, line in imports(name, path, known):
            if target not in known:
                continue  # a name from moec's packages that is not a module file (checked by importing)
            if target != name:
                edges[name].setdefault(target, line)
                for n in names:
                    private.setdefault((name, target, n), line)
    return known, edges, private


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def in_rewrite(module: str, known: dict[str, Path]) -> bool:
    rel = known[module].relative_to(ROOT).as_posix()
    return rel.startswith(REWRITE_IN_PROGRESS)


def test_known_offenders_are_only_in_the_folders_being_rewritten():
    known = modules()
    outside = sorted(e for e in KNOWN_CYCLE_EDGES | KNOWN_PRIVATE if e[0] not in known or not in_rewrite(e[0], known))
    assert not outside, f"only files of the emitter rewrite may be on the known lists: {outside}"


def test_no_import_cycle():
    known, edges, _ = graph()
    stale = sorted(e for e in KNOWN_CYCLE_EDGES if e[1] not in edges.get(e[0], {}))
    for importer, imported in KNOWN_CYCLE_EDGES:
        edges.get(importer, {}).pop(imported, None)
    found = cycles(edges)
    lines = []
    for component in found:
        members = set(component)
        lines.append(" <-> ".join(component) + ": " + "; ".join(
            f"{a} imports {b} ({known[a].relative_to(ROOT)}:{edges[a][b]})"
            for a in component for b in sorted(edges[a]) if b in members))
    assert not found, "import cycles among moec modules:\n" + "\n".join(lines)
    assert not stale, f"no longer imported: remove from KNOWN_CYCLE_EDGES: {stale}"


def test_no_private_name_imported_across_modules():
    known, _, private = graph()
    new = sorted((k, line) for k, line in private.items() if k not in KNOWN_PRIVATE)
    stale = sorted(KNOWN_PRIVATE - set(private))
    assert not new, "private names used across moec modules:\n" + "\n".join(
        f"{known[a].relative_to(ROOT)}:{line}: {name} of {b}" for (a, b, name), line in new)
    assert not stale, f"no longer used: remove from KNOWN_PRIVATE: {stale}"


def test_pipeline_stages_do_not_run_the_reference_interpreter():
    """A pipeline stage runs the program's own modules: nothing it imports, directly or not, is the interpreter."""
    _, edges, _ = graph()
    reached, pending = set(), ["moec.backends.parallel.pipeline"]
    while pending:
        module = pending.pop()
        if module not in reached:
            reached.add(module)
            pending += edges.get(module, {})
    assert "moec.backends.parallel.pipeline" in edges and len(reached) > 3
    assert not [m for m in reached if m.startswith("moec.backends.reference")]
