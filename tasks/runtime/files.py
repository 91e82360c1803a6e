"""Files as the stages keep them: content digests, inter-process locks and owners, atomic
writes, and content-addressed outputs (a staging folder, published under its digest with a
manifest; docs/design.md "Failure modes"). Part of the runtime: no stage's cache key covers it.

Nothing here imports Prefect or MLflow: stage cores run in pytest, in a notebook or on a GPU box
that has neither installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
from filelock import FileLock

from tasks.runtime.errors import DataError
from tasks.runtime.manifest import build_manifest, check_manifest, files_of, hash_file, \
    write_manifest
from tasks.runtime.pause import pause_point
from tasks.runtime.paths import project_dir
from tasks.runtime.progress import step


# ---------------------------------------------------------------------------------------------
# Digests
# ---------------------------------------------------------------------------------------------
#: files bigger than this (multi-GB weights of a user's base model) are fingerprinted by
#: (size, mtime) instead of content, so pointing the pipeline at a 6B model does not re-read it.
LARGE_FILE_BYTES = 256 << 20
#: content digest of one file (blake2b-128, streamed)
digest_file = hash_file


def digest_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _tree_digest(parts: Iterator[tuple[str, int, int, Any]]) -> str:
    """Digest of (relative name, size, mtime_ns, content hash or a callable giving it)."""
    h = hashlib.blake2b(digest_size=16)
    for name, size, mtime_ns, content in parts:
        part = (f"size={size};mtime={mtime_ns}" if size > LARGE_FILE_BYTES
                else content() if callable(content) else content)
        h.update(f"{name}\0{part}\n".encode())
    return h.hexdigest()


def digest_path(path: Path, file_digest: Callable[[Path], str] = digest_file) -> str:
    """Digest of a file, or of a directory tree (relative names + file digests; a published
    directory's own manifest does not count).

    Touching a file without changing it keeps the digest; any changed byte changes it.
    `file_digest` computes each file's digest (e.g. a memoised `digest_file`)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        raise FileNotFoundError(path)

    def parts():
        for p in files_of(path):
            st = p.stat()
            yield (p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns,
                   lambda p=p: file_digest(p))
    return _tree_digest(parts())


# ---------------------------------------------------------------------------------------------
# Locks and owners: what a process holds, and whether the process that made something is gone
# ---------------------------------------------------------------------------------------------
def file_lock(name: str) -> FileLock:
    """An inter-process lock under <project>/.locks/ (released by the OS if its holder dies)."""
    locks = project_dir() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(locks / f"{name}.lock")


def _host_tag() -> str:
    return digest_bytes(socket.gethostname().encode())[:8]


def owner_tag(pid: int | None = None) -> str:
    """"<pid>-<start time>-<host hash>" of a process (default: this one): names what it is
    making, so a later run can tell whether the maker is gone (a pid alone can be recycled)."""
    pid = pid or os.getpid()
    return f"{pid}-{int(psutil.Process(pid).create_time() * 100)}-{_host_tag()}"


def owner_gone(tag: str) -> bool | None:
    """True if the process of an `owner_tag` no longer runs, False if it does, None if that
    cannot be told here (another host, or not a tag)."""
    try:
        pid, start, host = tag.split("-")
        pid_, start_ = int(pid), int(start)
    except ValueError:
        return None
    if host != _host_tag():
        return None
    try:
        return int(psutil.Process(pid_).create_time() * 100) != start_
    except psutil.NoSuchProcess:
        return True


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


def require_free_space(folder: Path, needed_bytes: float, what: str) -> None:
    """Fail at once, in one line, when the disk of `folder` has less than `needed_bytes` (plus
    1 GiB of margin) free: a stage about to write gigabytes checks first, instead of dying
    mid-write with `No space left on device` (docs/design.md "Disk")."""
    folder = Path(folder)
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if free < needed_bytes + (1 << 30):
        raise DataError(folder, f"{what} needs about {needed_bytes / 2**30:.1f} GiB free on "
                                f"this disk (plus 1 GiB to spare); {free / 2**30:.1f} GiB "
                                "are free", hint="free some space, or point PIPELINE_HOME at "
                                                 "a bigger disk")


_LEFTOVERS = (".staging-", ".trash-")       # names of unfinished/retired dirs: prefix + owner


@contextmanager
def staging_dir(parent: Path) -> Iterator[Path]:
    """A temp directory under `parent`, named after this process, that is removed if the block
    fails (and by `sweep_leftovers` if the process is killed).

    Use `publish_dir` at the end of the block to move it to its content-addressed name."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".staging-{owner_tag()}-"))
    try:
        pause_point(parent.name)                # tests signal a stage here (tasks/runtime/pause.py)
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, parent: Path) -> tuple[Path, str]:
    """Rename a finished staging dir to `parent/<digest>` with a manifest of its files (size,
    mtime, content hash); return (path, digest). Idempotent: an existing copy that still
    matches its manifest is kept, a damaged one is replaced. Holds the stage's publish lock."""
    with step(f"hashed the files of {Path(parent).name}'s output", phase="hash"):
        entries = build_manifest(tmp)
    digest = _tree_digest((name, e.size, e.mtime_ns, e.blake2b) for name, e in entries.items())
    write_manifest(tmp, entries, digest)
    os.chmod(tmp, 0o755)             # mkdtemp makes 0700; outputs are meant to be shared/read
    final = Path(parent) / digest
    with file_lock(f"publish-{Path(parent).name}"):
        if check_manifest(final) is None:       # identical content published before: keep it
            shutil.rmtree(tmp)
            return final, digest
        if final.exists():                      # damaged or foreign: retire it, then replace
            trash = Path(tempfile.mkdtemp(dir=parent, prefix=f".trash-{owner_tag()}-"))
            os.replace(final, trash / digest)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
    return final, digest


def sweep_leftovers(root: Path | None = None) -> list[Path]:
    """Remove staging (and retired) directories under <project>/outputs/<stage>/ whose owning
    process is gone: what a killed run left half-done. Returns what was removed."""
    root = Path(root) if root else project_dir() / "outputs"
    removed = []
    for stage in (root.iterdir() if root.is_dir() else []):
        for d in (stage.iterdir() if stage.is_dir() else []):
            prefix = next((p for p in _LEFTOVERS if d.name.startswith(p)), None)
            if prefix is None:
                continue
            owner = d.name[len(prefix):].rsplit("-", 1)[0]
            if owner_gone(owner):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def published_dir(path: Path | str) -> Path | None:
    """The content-addressed directory (<project>/outputs/<stage>/<digest>) holding `path`, or
    None for a path outside the outputs (a user's own model, a hub id)."""
    root = project_dir() / "outputs"
    try:
        parts = Path(path).relative_to(root).parts
    except ValueError:
        return None
    return root / parts[0] / parts[1] if len(parts) >= 2 else None


def verify_outputs(paths: list[str]) -> str | None:
    """None if every published directory behind `paths` still matches its manifest and every
    path exists; else the first problem, in words."""
    for d in dict.fromkeys(d for d in map(published_dir, paths) if d is not None):
        if problem := check_manifest(d):
            return problem
    for p in paths:
        if published_dir(p) is not None and not Path(p).exists():
            return f"{p} is missing"
    return None


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
