"""What a published output directory held when it was published: each file's size, mtime and
content hash, in `.manifest.json` inside the directory (docs/design.md "Failure modes").

A cache hit is only as good as the files it points at: `check_manifest` compares the directory
with its manifest before anything trusts it. Size and mtime are the fast pre-check; a file whose
mtime moved is hashed again, so a touched but unchanged file still passes.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MANIFEST = ".manifest.json"
_CHUNK = 1 << 20


def hash_file(path: Path) -> str:
    """Content hash of one file (blake2b-128, streamed)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Entry:
    """One file of a published directory."""

    size: int
    mtime_ns: int
    blake2b: str


def files_of(root: Path) -> list[Path]:
    """The files of a directory tree, sorted by relative name, the manifest itself excluded."""
    root = Path(root)
    return sorted((p for p in root.rglob("*") if p.is_file()
                   and not (p.parent == root and p.name.startswith(MANIFEST))),
                  key=lambda p: p.relative_to(root).as_posix())


def build_manifest(root: Path) -> dict[str, Entry]:
    """Hash every file of `root` (relative POSIX name -> Entry), several files at a time:
    hashlib releases the GIL, so a 6 B model's 12.5 GB hash in 5 s on 8 threads instead of 21
    (benchmarks/stage_phases.py)."""
    files = files_of(root)
    stats = [p.stat() for p in files]               # before hashing: a later write shows
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        hashes = list(pool.map(hash_file, files))
    return {p.relative_to(root).as_posix(): Entry(st.st_size, st.st_mtime_ns, digest)
            for p, st, digest in zip(files, stats, hashes)}


def write_manifest(root: Path, entries: dict[str, Entry], digest: str) -> Path:
    """Write `root/.manifest.json` (atomically: a torn manifest must not look valid)."""
    path = Path(root) / MANIFEST
    body = {"digest": digest, "files": {name: e.__dict__ for name, e in entries.items()}}
    tmp = path.with_name(f"{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(root: Path) -> dict[str, Entry]:
    body = json.loads((Path(root) / MANIFEST).read_text(encoding="utf-8"))
    return {name: Entry(int(e["size"]), int(e["mtime_ns"]), str(e["blake2b"]))
            for name, e in body["files"].items()}


def check_manifest(root: Path) -> str | None:
    """None if `root` holds exactly the files of its manifest with their content; else what
    differs, in words (the first problem found)."""
    root = Path(root)
    if not root.is_dir():
        return f"{root} is missing"
    try:
        entries = read_manifest(root)
    except FileNotFoundError:
        return f"{root} has no {MANIFEST} (published by an older version, or not by us)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{root / MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for name, want in entries.items():
        p = root / name
        try:
            st = p.stat()
        except OSError:
            return f"{p} is missing"
        if st.st_size != want.size:
            return f"{p} has {st.st_size:,} bytes; {want.size:,} were published"
        if st.st_mtime_ns != want.mtime_ns and hash_file(p) != want.blake2b:
            return f"{p} was modified after it was published (its content hash differs)"
    extra = [p for p in files_of(root) if p.relative_to(root).as_posix() not in entries]
    if extra:
        return f"{extra[0]} was added after the directory was published"
    return None
