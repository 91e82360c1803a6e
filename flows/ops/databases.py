"""A new project home starts with its Prefect and MLflow databases copied from templates.

Prefect's server and MLflow's tracking store each keep their state in a SQLite file of the
project home (docs/operations.md "The local stack, one command each"). On a new home, each creates its
schema by running every one of its migrations (alembic): about 14 s for Prefect's and 5 s for
MLflow's on a 2-core machine, to arrive at the same empty schema every time. So the empty schema
is made once per machine and library version, as a template under `~/.cache/finetune-pipeline/`
(or `$XDG_CACHE_HOME`), and a new home gets a copy in well under a second. Prefect and MLflow
then find their schema at its head and run no migration (docs/design.md "Orchestration overhead").

A template is built in a folder of its own and renamed into place when complete, and a copy is
published with a link that never replaces a file: a killed run leaves no half-made database that
a later run would open, and a home's existing database is never touched. Where the cache folder
cannot be written, or making a template failed, the databases are created as before.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

#: Prefect's schema, and the block types a server registers at its first start (with them in
#: the copy, servers started together on a new home update rows, instead of racing to insert
#: the same ones: "UNIQUE constraint failed: block_type.slug")
_PREFECT = """
import asyncio
from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration

async def make():
    db = provide_database_interface()
    await db.create_db()
    async with await db.session() as session:
        await run_block_auto_registration(session=session)

asyncio.run(make())
"""
#: the command that leaves an empty database of each kind in the folder it is run in, whose
#: file it names
_MAKE = {
    "prefect": ("prefect.db", ["-c", _PREFECT]),
    "mlflow": ("mlflow.db", ["-c", "from mlflow.store.tracking.sqlalchemy_store import "
                                   "SqlAlchemyStore; SqlAlchemyStore('sqlite:///mlflow.db', "
                                   "'mlruns')"]),
}
#: part of a template's name: raise it when what `_MAKE` puts in a template changes
FORMAT = 2


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune-pipeline"


def seed(kind: str, target: Path) -> bool:
    """Give a new home its empty `kind` ("prefect" or "mlflow") database at `target`, copied
    from the template; True if it was copied. An existing `target` is left alone."""
    target = Path(target)
    if target.exists():
        return False
    try:
        source = template(kind)
        if source is None:
            return False                # making it failed once: created the slow way
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
        os.close(fd)
    except OSError:
        return False                    # no cache folder to write: created the slow way
    try:
        shutil.copyfile(source, tmp)
        os.link(tmp, target)            # never replaces: a run that got there first wins
        log.info("new project: %s database %s copied from %s", kind, target, source)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def seed_mlflow(tracking_uri: str) -> bool:
    """`seed` for an MLflow tracking URI that names a SQLite file (else nothing to do)."""
    prefix = "sqlite:///"
    return tracking_uri.startswith(prefix) and seed("mlflow", Path(tracking_uri[len(prefix):]))


def template_path(kind: str) -> Path:
    """Where the template of `kind` for the installed version (of the package `kind`, whose
    version is the schema's) is kept."""
    version = importlib.metadata.version(kind)
    return cache_dir() / f"{kind}-{version}-v{FORMAT}-{_MAKE[kind][0]}"


def template(kind: str) -> Path | None:
    """The template of `kind` for the installed version, made on first use; None if making
    it failed (the reason is kept beside it, in `<template>.failed`, and it is not tried
    again for this version)."""
    name, args = _MAKE[kind]
    path = template_path(kind)
    failed = path.with_name(path.name + ".failed")
    if path.exists() or failed.exists():
        return path if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".lock")):
        if path.exists() or failed.exists():      # another process got here first
            return path if path.exists() else None
        with tempfile.TemporaryDirectory(prefix=f".{kind}-", dir=path.parent) as tmp:
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("PREFECT_API_", "MLFLOW_"))}
            env["PREFECT_HOME"] = tmp
            made = Path(tmp) / name
            try:
                subprocess.run([sys.executable, *args], cwd=tmp, env=env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                if kind == "mlflow":   # its default experiment is made again where it is used,
                    _execute(made, "DELETE FROM experiment_tags WHERE experiment_id = 0",
                             "DELETE FROM experiments WHERE experiment_id = 0")  # there
                _compact(made, Path(tmp) / "template.db")
            except (subprocess.CalledProcessError, sqlite3.Error) as e:
                detail = getattr(e, "stderr", b"") or b""
                failed.write_text(f"{e}\n{detail.decode(errors='replace')}", encoding="utf-8")
                return None
            os.replace(Path(tmp) / "template.db", path)
    return path


def _execute(db: Path, *statements: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        for statement in statements:
            conn.execute(statement)


def _compact(db: Path, out: Path) -> None:
    """One self-contained file of `db` (its write-ahead log folded in), checked."""
    with contextlib.closing(sqlite3.connect(db)) as src, \
            contextlib.closing(sqlite3.connect(out)) as dst:
        src.backup(dst)
        if dst.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError(f"template {out} failed its integrity check")
