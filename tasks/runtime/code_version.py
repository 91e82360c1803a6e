"""The version of a stage's code: a digest of the syntax trees of its module and of every
`tasks.*` module it imports, transitively, except the runtime (`tasks/runtime/`, which moves
results but computes none). Comments, formatting and docstrings do not count.

The config schema (`tasks/config/__init__.py`, `tasks/config/load.py`) is not part of it: a stage
sees its own config section as an input value, so a reworded field description of one section
changes no stage, and a changed default changes exactly the stages whose section it is in.

Used by the Prefect cache keys (flows/caching.py) and by the train stage's checkpoint key, so
neither a cached result nor a resumed checkpoint outlives a change to the code that made it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path
from typing import Iterator

from tasks.runtime.paths import REPO_DIR


#: modules keyed by the values they produce (each stage's config section), not by their code
SCHEMA_MODULES = ("tasks.config", "tasks.config.load", "tasks.config.run_form")
#: the runtime beneath the stages (paths, errors, digests, staging and publishing, locks,
#: progress, child processes): it moves results around and computes none of them, so a change
#: to it -- a new stage name, a new error -- re-keys no stage
RUNTIME = "tasks.runtime."


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "tasks" or name in SCHEMA_MODULES or name.startswith(RUNTIME):
        return None
    path = REPO_DIR.joinpath(*parts).with_suffix(".py")
    return path if path.is_file() else None


def _executed(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of `tree` except what sits under `if TYPE_CHECKING:`: an import there names a
    type for the reader and the type checker (e.g. the stage output a core reads) and never
    runs, so it does not make that module part of the code's closure."""
    for node in ast.iter_child_nodes(tree):
        if _type_checking_only(node):
            for child in node.orelse:           # an `else:` of it does run
                yield child
                yield from _executed(child)
            continue
        yield node
        yield from _executed(node)


def _type_checking_only(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or \
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


@functools.lru_cache(maxsize=512)
def _parsed(source: str) -> tuple[frozenset[str], str]:
    """(every module name a source imports, its `code_text`): parsed once per distinct source
    text: the files are still read on every call, but a stage's cache key no longer parses
    its whole code closure again (0.2-0.3 s per stage on the 2-core machine)."""
    found: set[str] = set()
    for node in _executed(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                                  # from . import x / from .x import y
                base = ".".join(["tasks"] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return frozenset(found), code_text(source)


def _closure_sources(module: str) -> dict[Path, str]:
    """Source text of `module` and of every `tasks.*` module it imports (absolute or relative
    imports, any depth), transitively, by file; each file read once."""
    sources: dict[Path, str] = {}
    todo = [module]
    while todo:
        path = _module_file(todo.pop())
        if path is None or path in sources:
            continue
        sources[path] = path.read_text(encoding="utf-8")
        todo.extend(m for m in _parsed(sources[path])[0] if _module_file(m))
    return sources


def code_closure(module: str) -> list[Path]:
    """Source files of `module` and every `tasks.*` module it imports, transitively."""
    return sorted(_closure_sources(module))


def code_text(source: str) -> str:
    """What counts of a module's source: its syntax tree without docstrings."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def code_digest(module: str) -> str:
    """Digest of `code_closure(module)`, read from disk on every call: a long-running server
    process must see code edited under it."""
    h = hashlib.blake2b(digest_size=16)
    for path, source in sorted(_closure_sources(module).items()):
        tree = _parsed(source)[1]
        h.update(path.relative_to(REPO_DIR).as_posix().encode() + b"\0" + tree.encode())
        # sibling templates/data a module reads (e.g. report_template.html) count as code too
        for extra in sorted(path.parent.glob(f"{path.stem}_*.html")):
            h.update(extra.read_bytes())
    return h.hexdigest()
