"""Content digests of input files, remembered by their stat: a run on unchanged input does not
read a 200 MB file again to find out that it is unchanged.

Each file's digest is stored with the stat it was taken at (size, mtime, ctime, inode, device)
under `<project>/.cache/digests/`. A lookup whose stat matches returns the stored digest; any
difference (a touch, an edit, a replacement, a copy in its place) reads and hashes the file
again, so the digest always follows the bytes. ctime is on the list because no user tool can set
it back: an edit that restores size and mtime (`touch -d`) still changes it. Like git's index
("racy git"), a digest taken within `RACY_SECONDS` of the file's last change is not stored, since
a second write in the same clock tick could leave every stat field as it was.

Nothing is trusted that is not re-checked: a lost or corrupt memo only costs a re-read.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tasks.runtime.files import atomic_write_json, digest_bytes, digest_file, digest_path
from tasks.runtime.paths import project_dir

RACY_SECONDS = 2.0


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def memo_dir() -> Path:
    return project_dir() / ".cache" / "digests"


def memo_digest_file(path: Path) -> str:
    """`digest_file(path)`, read from the memo when the file's stat is the one recorded."""
    path = Path(path).resolve()
    memo = memo_dir() / f"{digest_bytes(str(path).encode())}.json"
    before = _signature(path.stat())
    try:
        entry = json.loads(memo.read_text(encoding="utf-8"))
        if entry["path"] == str(path) and entry["stat"] == before:
            return entry["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = digest_file(path)
    after = path.stat()
    settled = time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns) > RACY_SECONDS * 1e9
    if _signature(after) == before and settled:          # not changed while it was read
        try:
            atomic_write_json(memo, {"path": str(path), "stat": before, "digest": digest})
        except OSError:                                  # a read-only project: just no memo
            pass
    return digest


def memo_digest_path(path: Path) -> str:
    """`digest_path` (a file, or a directory tree) with every file's digest memoised."""
    return digest_path(path, file_digest=memo_digest_file)
