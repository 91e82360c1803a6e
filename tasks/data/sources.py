"""Input files before any format: which files a source holds, bytes that are really UTF-8 text,
the records of a JSON array or JSON Lines file, and the bookkeeping of malformed records (fail
at the first one, or skip and count them)."""

from __future__ import annotations

import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import orjson
import pyarrow as pa

from tasks.runtime.errors import DataError

OnError = Literal["fail", "skip"]
SUFFIXES = (".txt", ".json", ".jsonl")
BOM = b"\xef\xbb\xbf"
#: skipped records kept as examples (the counts cover all of them)
MAX_EXAMPLES = 200
_NOT_SPACE = re.compile(rb"[^ \t\r\n]")


def natural_key(name: str) -> list:
    """Sort key that puts part-2 before part-10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _walk_error(error: OSError) -> None:
    raise DataError(error.filename or "?", f"cannot be read: {error.strerror}",
                    hint="check the permissions of the data directory") from None


def discover(source: Path) -> tuple[list[Path], list[Path]]:
    """(data files, ignored files) of a source: a file, or a directory whose .txt/.json/.jsonl
    files (any depth, hidden ones excluded) form one data set, in natural path order."""
    source = Path(source)
    try:
        mode = source.stat().st_mode
    except FileNotFoundError:
        raise DataError(source, "no such file or directory") from None
    except OSError as e:
        raise DataError(source, f"cannot be read: {e.strerror}") from None
    if stat.S_ISREG(mode):
        return [source], []
    if not stat.S_ISDIR(mode):
        raise DataError(source, "is neither a regular file nor a directory (a pipe, a socket "
                                "or a device?)")
    found, seen = [], set()
    for top, dirs, names in os.walk(source, onerror=_walk_error, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:              # a symlink loop: been here
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(top) / n for n in names if not n.startswith(".")
                  and (Path(top) / n).is_file()]
    files, ignored = [], []
    for p in sorted(found, key=lambda p: natural_key(p.relative_to(source).as_posix())):
        (files if p.suffix.lower() in SUFFIXES else ignored).append(p)
    if not files:
        raise DataError(source, f"the directory holds no {'/'.join(SUFFIXES)} files")
    return files, ignored


def read_text_bytes(path: Path) -> bytes:
    """The file's bytes, checked to be non-empty UTF-8 text without NUL bytes (BOM removed)."""
    try:
        raw = Path(path).read_bytes().removeprefix(BOM)
    except OSError as e:
        raise DataError(path, f"cannot be read: {e.strerror}") from None
    if not raw or raw.isspace():
        raise DataError(path, "the file is empty (or holds only white space)")
    if b"\0" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\0")) + 1
        raise DataError(path, "contains a NUL byte: this is a binary file, or UTF-16 text; "
                              "save it as UTF-8 text", line=line)
    try:
        _check_utf8(raw)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(path, f"is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                              f"{e.start}): save the file as UTF-8", line=line) from None
    return raw


def _check_utf8(raw: bytes) -> None:
    """Raise UnicodeDecodeError (with its position) unless `raw` is UTF-8. pyarrow checks
    twice as fast as decoding; Python's decoder then locates a problem."""
    text = pa.Array.from_buffers(pa.large_string(), 1, [
        None, pa.py_buffer(np.array([0, len(raw)], np.int64)), pa.py_buffer(raw)])
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        raw.decode("utf-8")
        raise


def first_char(raw: bytes) -> bytes:
    """The first byte that is not JSON white space (b"" if none)."""
    found = _NOT_SPACE.search(raw)
    return found.group() if found else b""


_JSON_TOKEN = re.compile(rb'"(?:[^"\\\n]|\\.)*"|[\[\]{},\n]')


class ArrayLines:
    """The line each element of a (valid) JSON array starts on, found by scanning the bytes
    only as far as asked: errors name a line, and the happy path never pays for it."""

    def __init__(self, raw: bytes):
        self._raw, self._tokens = raw, _JSON_TOKEN.finditer(raw)
        self._starts: list[int] = []
        self._line, self._depth = 1, 0

    def line_of(self, index: int) -> int | None:
        for m in self._tokens:
            if len(self._starts) > index:
                break
            token = m.group()
            if token == b"\n":
                self._line += 1
            elif token in (b"[", b"{"):
                self._depth += 1
            elif token in (b"]", b"}"):
                self._depth -= 1
            if self._depth == 1 and token in (b"[", b","):    # an element starts next
                nxt = _NOT_SPACE.search(self._raw, m.end())
                if nxt is not None and nxt.group() != b"]":
                    self._starts.append(self._line + self._raw.count(
                        b"\n", m.end(), nxt.start()))
        return self._starts[index] if index < len(self._starts) else None


@dataclass
class Issues:
    """Malformed records: raised at once (on_error="fail") or skipped, counted by kind and kept
    as examples (on_error="skip")."""

    on_error: OnError = "fail"
    counts: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)

    def report(self, kind: str, error: DataError) -> None:
        if self.on_error == "fail":
            error.hint = error.hint or ("fix the record, or set data.on_error=skip to skip "
                                        "malformed records (they are counted and listed in "
                                        "the data report)")
            raise error
        self.counts[kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"kind": kind, "file": error.path, "line": error.line,
                                  "record": error.record, "json_path": error.json_path,
                                  "reason": error.reason, "message": str(error)})

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())


def json_records(path: Path, raw: bytes, issues: Issues
                  ) -> Iterator[tuple[int, int | None, Any]]:
    """(record index, line or None, value) of a JSON array or a JSON Lines file. A .json file
    whose top level is one object is refused: it is a record where a list of them was meant
    (as JSON Lines it would be a data set of one)."""
    if path.suffix.lower() == ".json" and first_char(raw) == b"{":
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            value = None                            # JSON Lines in a .json file: read below
        if isinstance(value, dict):
            raise DataError(path, "the top level is one JSON object, not a list of records",
                            line=1, hint="a .json data set is a JSON array of records "
                                         "([{...}, {...}]); JSON Lines (.jsonl) has one record "
                                         "per line")
    if first_char(raw) == b"[":
        try:
            records = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise DataError(path, f"invalid JSON: {e.msg} (column {e.colno})",
                            line=e.lineno) from None
        if not isinstance(records, list):           # e.g. "[1] 2" is refused above
            raise DataError(path, "expected a JSON array of records")
        if not records:
            raise DataError(path, "the JSON array is empty: no records")
        yield from ((i, None, r) for i, r in enumerate(records))
        return
    index = 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            if index == 0 and line.strip() == b"{":
                raise DataError(path, "is pretty-printed JSON (its first line is only '{'): "
                                      "expected a JSON array of records, or JSON Lines (one "
                                      "record per line)", line=number) from None
            issues.report("invalid-json", DataError(
                path, f"line is not valid JSON: {e.msg} (column {e.colno})", line=number,
                record=index))
        else:
            yield index, number, value
        index += 1
