"""Input formats: every common shape of fine-tuning data, read into one conversation table.

    txt           question line, answer line, blank line
    qa            {"q", "a"} (the intermediate JSON of raw Q/A text)
    adgen         {"content", "summary"} (ChatGLM's P-Tuning v2 ADGEN example)
    alpaca        {"instruction", "output"} with optional "input", "system", "history"
                  ({"instruction", "output"} is alpaca without "input")
    instruct      {"instruct", "query", "answer"}
    sharegpt      {"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}]}
    conversation  {"conversations": [{"role": "system"|"user"|"assistant", "content"}]}
                  (ChatGLM3's own format: passed through, and checked)

JSON records come as a JSON array or as JSON Lines (one object per line, whatever the file's
extension: some tutorials keep JSON Lines in .txt files). The format is detected from the record's
fields, or configured. A file (or a directory) holds ONE format: a record of another format is
an error naming it, never a guess. Every record is checked (types, empty texts, length, turn
order) and a problem names the file, line or record, and the JSON path of the offending value.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import orjson
import pyarrow as pa

from tasks.runtime.errors import DataError
from tasks.data.records import FORMATS, KNOWN, BadRecord, an, check_turns, object_at
from tasks.data.dataset_io import conversations_array, pair_conversations, text_array
from tasks.data.qa_text import parse_qa_bytes
from tasks.data.sources import (
    ArrayLines,
    Issues,
    OnError,
    discover,
    first_char,
    json_records,
    read_text_bytes,
)

Format = Literal["auto", "txt", "qa", "adgen", "alpaca", "instruct", "sharegpt", "conversation"]


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def _is_json(path: Path, raw: bytes, fmt: Format) -> bool:
    """JSON (array or lines) or raw text? By the configured format, the extension, then the
    content: a .txt that parses as a JSON array of objects, or whose first line is a record of
    a known format, is JSON (some tutorials keep JSON Lines in .txt files)."""
    if fmt == "txt":
        return False
    head = first_char(raw)
    if fmt != "auto" or path.suffix.lower() in (".json", ".jsonl"):
        if head not in (b"[", b"{"):
            raise DataError(path, f"is not JSON (it starts with neither '[' nor '{{'), but "
                                  f"{'its extension' if fmt == 'auto' else f'format={fmt}'} "
                                  "says it is")
        return True
    try:
        if head == b"[":
            value = orjson.loads(raw)
            return isinstance(value, list) and all(isinstance(r, dict) for r in value)
        if head == b"{":
            start = raw.index(b"{")
            end = raw.find(b"\n", start)
            first = orjson.loads(raw[start:end if end >= 0 else None])
            return isinstance(first, dict) and any(f.matches(first) for f in FORMATS.values())
    except orjson.JSONDecodeError:
        pass
    return False


@dataclass(frozen=True)
class _Where:
    """Record `index` of a file, on `line` (JSON Lines) or on the line its array element
    starts on (looked up only when an error needs it)."""

    array: ArrayLines
    index: int
    line: int | None

    def fields(self) -> dict[str, int | None]:
        return {"record": self.index,
                "line": self.array.line_of(self.index) if self.line is None else self.line}


@dataclass
class Collected:
    """Turns of all records so far, flat (columns to be), with where each record came from."""

    roles: list[str]
    contents: list[str]
    sizes: list[int]
    files: list[int]
    lines: list[int | None]
    records: list[int]
    ignored_fields: Counter

    @classmethod
    def empty(cls) -> "Collected":
        return cls([], [], [], [], [], [], Counter())


def _read_json_file(path: Path, raw: bytes, file_no: int, fmt: str, origin: str,
                    max_chars: int, issues: Issues, out: Collected) -> tuple[str, str]:
    """Convert the records of one JSON file into `out`. `fmt` is the data set's format so far
    ("auto" until a record decides it) and `origin` says where it came from; returns both."""
    array = ArrayLines(raw)                 # where array records start: for errors only
    for index, line, rec in json_records(path, raw, issues):
        prefix = "$" if line is not None else f"$[{index}]"
        here = _Where(array, index, line)
        try:
            rec = object_at(rec, "")
            candidates = [f.name for f in FORMATS.values() if f.matches(rec)]
            if fmt == "auto" and candidates == ["sharegpt", "conversation"]:
                # no turn tells which: an empty list has no turns; else read it as ChatGLM3's
                # format, whose checks then say what its turns lack
                if rec["conversations"] == []:
                    raise BadRecord("no-turns", ".conversations",
                                    "is an empty list: the record has no turns")
                candidates = ["conversation"]
            if fmt not in candidates:
                if fmt == "auto" and len(candidates) == 1:
                    fmt, origin = candidates[0], f"{path.name} record #{index}"
                elif fmt == "auto" and candidates:
                    raise DataError(path, f"the record matches several formats ("
                                    f"{', '.join(candidates)}): set `format` in the config",
                                    json_path=prefix, **here.fields())
                elif fmt == "auto":
                    raise DataError(path, f"the record's fields ({', '.join(rec) or 'none'}) "
                                    f"match no known format; known formats: {KNOWN}",
                                    json_path=prefix, **here.fields())
                elif candidates:
                    raise DataError(path, f"this is {an(candidates[0])} record, but the data "
                                    f"set's format is {fmt} (from {origin}): a file or "
                                    "directory must hold one format", json_path=prefix,
                                    **here.fields())
                else:
                    raise BadRecord("missing-field", "", f"is not a {fmt} record "
                                    f"{FORMATS[fmt].fields}: it has the fields "
                                    f"{', '.join(rec) or 'none'}")
            turns = FORMATS[fmt].convert(rec)
            check_turns(turns, max_chars)
        except BadRecord as bad:
            issues.report(bad.kind, bad.error(path, record=index, line=line, lines=array))
            continue
        out.ignored_fields.update(k for k in rec if k not in FORMATS[fmt].known)
        out.roles += [t[0] for t in turns]
        out.contents += [t[1] for t in turns]
        out.sizes.append(len(turns))
        out.files.append(file_no)
        out.lines.append(line)
        out.records.append(index)
    return fmt, origin


@dataclass(frozen=True)
class Loaded:
    """A source read into conversations, with where each record came from."""

    table: pa.Table              # conversations, file (index into files), line, record
    files: list[str]
    format: str                  # the data set's format
    ignored_files: list[str]
    ignored_fields: dict[str, int]


def read_source(source: Path, fmt: Format = "auto", *, on_error: OnError = "fail",
                max_chars: int = 100_000, issues: Issues | None = None) -> Loaded:
    """Read a file, or a directory of files of one format, into one conversation table."""
    issues = issues or Issues(on_error)
    paths, ignored = discover(source)
    parts: list[pa.Table] = []
    json_rows = Collected.empty()
    expected, origin = fmt, "the config's `format`"
    for file_no, path in enumerate(paths):
        raw = read_text_bytes(path)
        if _is_json(path, raw, fmt):
            if expected == "txt":
                raise DataError(path, f"is JSON, but the data set's format is txt (from "
                                      f"{origin}): a directory must hold one format")
            found, origin = _read_json_file(path, raw, file_no, expected, origin, max_chars,
                                            issues, json_rows)
        else:
            if expected not in ("auto", "txt"):
                raise DataError(path, f"is raw Q/A text, but the data set's format is "
                                      f"{expected} (from {origin}): a directory must hold "
                                      "one format")
            if expected == "auto":
                origin = path.name
            found = "txt"
            cols = parse_qa_bytes(raw, path, max_chars=max_chars, issues=issues)
            parts.append(pa.table({
                "conversations": pair_conversations(cols.texts),
                "file": pa.array(np.full(len(cols.line), file_no), pa.int32()),
                "line": pa.array(cols.line, pa.int64()),
                "record": pa.array(np.arange(len(cols.line)), pa.int64())}))
        expected = found
    if json_rows.sizes:
        c = json_rows
        parts.append(pa.table({
            "conversations": conversations_array(np.concatenate(([0], np.cumsum(c.sizes))),
                                                  text_array(c.roles), text_array(c.contents)),
            "file": pa.array(c.files, pa.int32()), "line": pa.array(c.lines, pa.int64()),
            "record": pa.array(c.records, pa.int64())}))
    table = pa.concat_tables(parts) if parts else None
    if table is None or table.num_rows == 0:
        raise DataError(source, f"no usable records ({issues.skipped} skipped as malformed)")
    return Loaded(table=table, files=[str(p) for p in paths], format=expected,
                  ignored_files=[str(p) for p in ignored],
                  ignored_fields=dict(json_rows.ignored_fields))
