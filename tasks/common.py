"""Shared plumbing for every stage: project paths, errors, digests, atomic outputs, stage results.

Nothing here imports Prefect or MLflow: stage cores run in pytest, in a notebook or on a GPU box
that has neither installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

REPO_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_DIR / "data"
SCHEMA_DIR = REPO_DIR / "schemas"


def project_dir() -> Path:
    """Where pipeline state lives (outputs/, mlflow.db, mlruns/, .prefect/).

    Defaults to the repository; `PIPELINE_HOME` moves all of it (tests use a temp dir)."""
    return Path(os.environ.get("PIPELINE_HOME", REPO_DIR)).resolve()


class DataError(ValueError):
    """Bad input: names the file, the line or record, and what is wrong."""

    def __init__(self, path: Path | str, reason: str, *, line: int | None = None,
                 record: int | None = None, json_path: str | None = None):
        self.path, self.reason, self.line, self.record, self.json_path = (
            str(path), reason, line, record, json_path)
        where = str(path)
        if line is not None:
            where += f":{line}"
        if record is not None:
            where += f" record #{record}"
        if json_path:
            where += f" at {json_path}"
        super().__init__(f"{where}: {reason}")


# ---------------------------------------------------------------------------------------------
# Digests
# ---------------------------------------------------------------------------------------------
_CHUNK = 1 << 20
#: files bigger than this (multi-GB weights of a user's base model) are fingerprinted by
#: (size, mtime) instead of content, so pointing the pipeline at a 6B model does not re-read it.
LARGE_FILE_BYTES = 256 << 20


def digest_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def digest_file(path: Path) -> str:
    """Content digest of one file (blake2b-128, streamed)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_path(path: Path, file_digest: Callable[[Path], str] = digest_file) -> str:
    """Digest of a file, or of a directory tree (relative names + file digests).

    Touching a file without changing it keeps the digest; any changed byte changes it.
    `file_digest` computes each file's digest (e.g. a memoised `digest_file`)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        raise FileNotFoundError(path)
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        st = p.stat()
        part = (f"size={st.st_size};mtime={st.st_mtime_ns}" if st.st_size > LARGE_FILE_BYTES
                else file_digest(p))
        h.update(f"{p.relative_to(path).as_posix()}\0{part}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Atomic outputs: write to a temp file/dir beside the target, then rename
# ---------------------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


@contextmanager
def staging_dir(parent: Path) -> Iterator[Path]:
    """A temp directory under `parent` that is removed if the block fails.

    Use `publish_dir` at the end of the block to move it to its content-addressed name."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".staging-"))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, parent: Path) -> tuple[Path, str]:
    """Rename a finished staging dir to `parent/<digest>` (idempotent); return (path, digest)."""
    digest = digest_path(tmp)
    final = Path(parent) / digest
    os.chmod(tmp, 0o755)             # mkdtemp makes 0700; outputs are meant to be shared/read
    if final.exists():           # identical content produced before: keep the old copy
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
    return final, digest


def stage_root(stage: str) -> Path:
    """Where a stage keeps its content-addressed outputs: <project>/outputs/<stage>/."""
    return project_dir() / "outputs" / stage


# ---------------------------------------------------------------------------------------------
# What a stage returns
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageResult:
    """The small, picklable record a stage returns (Prefect caches this; files stay on disk).

    `path` is the stage's main output (a file or a directory), `digest` its content digest, which
    is what downstream cache keys see. `files` names the individual artifacts worth browsing,
    `metrics` are numbers for MLflow, `info` is any JSON-able detail (e.g. loss curves).
    `result_id` is minted when the stage really executes, so a cache hit can be traced back to
    the run that computed it."""

    stage: str
    path: str
    digest: str
    files: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    result_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def file(self, name: str) -> Path:
        return Path(self.files[name])

    def exists(self) -> bool:
        return Path(self.path).exists() and all(Path(p).exists() for p in self.files.values())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
