"""The layout shows the architecture (docs/design.md "How the code is laid out"): small folders, and
imports that go one way between them -- flows over tasks, the stages over the model and the
runtime -- with no circle, between folders or between modules."""

from __future__ import annotations

import ast
from pathlib import Path

from tasks.runtime.paths import REPO_DIR

PACKAGES = ("tasks", "flows")
MAX_MODULES = 12


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO_DIR / package).rglob("*.py"):
            parts = path.relative_to(REPO_DIR).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _typing_only(tree: ast.Module) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (never imported when the code runs)."""
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for stmt in node.body for n in ast.walk(stmt)}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules a file imports, at any depth of its code (a lazy import inside a
    function counts: it is a dependency all the same; one for type checkers alone does not)."""
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _typing_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name not in PACKAGES:
                found.add(name)
    return found


def folder(module: str, known: dict[str, Path]) -> str:
    return module if known[module].name == "__init__.py" else module.rpartition(".")[0]


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` (node -> successors), or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_folder_holds_more_than_a_dozen_modules():
    for package in PACKAGES:
        for d in [REPO_DIR / package, *(p for p in (REPO_DIR / package).rglob("*")
                                         if p.is_dir() and p.name != "__pycache__")]:
            count = len([p for p in d.glob("*.py") if p.name != "__init__.py"])
            assert count <= MAX_MODULES, f"{d.relative_to(REPO_DIR)} holds {count} modules"


def test_imports_between_folders_go_one_way():
    known = modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        here = folder(module, known)
        graph.setdefault(here, set()).update(
            folder(m, known) for m in imports(path, known) if folder(m, known) != here)
    assert cycle(graph) is None, f"folders import each other: {' -> '.join(cycle(graph))}"
    assert "flows" not in {f.split(".")[0] for f in graph.get("tasks", ())}, \
        "the stage cores never import the flows"
    for f, targets in graph.items():
        if f.startswith("tasks"):
            assert not any(t.startswith("flows") for t in targets), (f, targets)


def test_no_module_imports_itself_round_about():
    known = modules()
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    assert cycle(graph) is None, f"an import circle: {' -> '.join(cycle(graph))}"
