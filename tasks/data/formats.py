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
from typing import Any, Callable, Literal

import numpy as np
import orjson
import pyarrow as pa

from tasks.runtime.errors import DataError
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
Turn = tuple[str, str, str, str]     # role, text, JSON paths (in the record) of text and role

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
                  "model": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


class BadRecord(Exception):
    """A problem inside one record: kind, JSON path below the record, plain-words reason."""

    def __init__(self, kind: str, where: str, reason: str):
        super().__init__(reason)
        self.kind, self.where, self.reason = kind, where, reason


def _an(word: str) -> str:
    return f"{'an' if word[:1] in 'aeio' else 'a'} {word}"


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "?")


def _text(rec: dict, key: str, where: str = "", *, optional: bool = False) -> str:
    value = rec.get(key)
    if value is None and optional:
        return ""
    if key not in rec:
        raise BadRecord("missing-field", where, f"has no field {key!r}")
    if not isinstance(value, str):
        shown = "" if value is None else f" ({orjson.dumps(value).decode()[:40]})"
        raise BadRecord("wrong-type", f"{where}.{key}",
                        f"is {_type_name(value)}{shown}, expected a string")
    return value


def _list(rec: dict, key: str, where: str = "", *, optional: bool = False) -> list:
    value = rec.get(key)
    if value is None and optional:
        return []
    if key not in rec:
        raise BadRecord("missing-field", where, f"has no field {key!r}")
    if not isinstance(value, list):
        raise BadRecord("wrong-type", f"{where}.{key}",
                        f"is {_type_name(value)}, expected an array")
    return value


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise BadRecord("wrong-type", where, f"is {_type_name(value)}, expected an object")
    return value


def _joined(*parts: str) -> str:
    return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# Record formats: their signature fields and how a record becomes turns
# ---------------------------------------------------------------------------------------------
def _qa(r: dict) -> list[Turn]:
    return [("user", _text(r, "q"), ".q", ""), ("assistant", _text(r, "a"), ".a", "")]


def _adgen(r: dict) -> list[Turn]:
    return [("user", _text(r, "content"), ".content", ""),
            ("assistant", _text(r, "summary"), ".summary", "")]


def _alpaca(r: dict) -> list[Turn]:
    out: list[Turn] = []
    if system := _text(r, "system", optional=True):
        out.append(("system", system, ".system", ""))
    for i, pair in enumerate(_list(r, "history", optional=True)):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise BadRecord("wrong-type", f".history[{i}]", f"is {_type_name(pair)}"
                            + (f" of {len(pair)} items" if isinstance(pair, list) else "")
                            + ", expected a [question, answer] pair")
        for j, (role, text) in enumerate(zip(("user", "assistant"), pair)):
            if not isinstance(text, str):
                raise BadRecord("wrong-type", f".history[{i}][{j}]",
                                f"is {_type_name(text)}, expected a string")
            out.append((role, text, f".history[{i}][{j}]", ""))
    prompt = _joined(_text(r, "instruction"), _text(r, "input", optional=True))
    return out + [("user", prompt, ".instruction", ""),
                  ("assistant", _text(r, "output"), ".output", "")]


def _instruct(r: dict) -> list[Turn]:
    return [("user", _joined(_text(r, "instruct"), _text(r, "query")), ".instruct", ""),
            ("assistant", _text(r, "answer"), ".answer", "")]


def _turn_list(r: dict, role_key: str, text_key: str, roles: dict[str, str]) -> list[Turn]:
    out: list[Turn] = []
    if role_key == "from" and (system := _text(r, "system", optional=True)):
        out.append(("system", system, ".system", ""))
    for i, turn in enumerate(_list(r, "conversations")):
        where = f".conversations[{i}]"
        turn = _object(turn, where)
        role = _text(turn, role_key, where)
        if role not in roles:
            raise BadRecord("unknown-role", f"{where}.{role_key}", f"role {role!r} is unknown "
                            f"(known: {', '.join(roles)})")
        out.append((roles[role], _text(turn, text_key, where), f"{where}.{text_key}",
                    f"{where}.{role_key}"))
    return out


def _sharegpt(r: dict) -> list[Turn]:
    return _turn_list(r, "from", "value", SHAREGPT_ROLES)


def _conversation(r: dict) -> list[Turn]:
    return _turn_list(r, "role", "content", {role: role for role in ROLES})


def _turn_keys(r: dict) -> set[str]:
    turns = r.get("conversations")
    first = turns[0] if isinstance(turns, list) and turns else None
    return set(first) if isinstance(first, dict) else set()


@dataclass(frozen=True)
class RecordFormat:
    name: str
    fields: str                                   # for messages: what the format looks like
    matches: Callable[[dict], bool]               # the record carries this format's signature
    convert: Callable[[dict], list[Turn]]
    known: frozenset[str]                         # top-level fields the format reads


FORMATS = {f.name: f for f in [
    RecordFormat("qa", '{"q", "a"}', lambda r: {"q", "a"} <= r.keys(), _qa,
                 frozenset({"q", "a"})),
    RecordFormat("adgen", '{"content", "summary"}', lambda r: {"content", "summary"} <= r.keys(),
                 _adgen, frozenset({"content", "summary"})),
    RecordFormat("alpaca", '{"instruction", "output"[, "input", "system", "history"]}',
                 lambda r: {"instruction", "output"} <= r.keys(), _alpaca,
                 frozenset({"instruction", "input", "output", "system", "history"})),
    RecordFormat("instruct", '{"instruct", "query", "answer"}',
                 lambda r: {"instruct", "query", "answer"} <= r.keys(), _instruct,
                 frozenset({"instruct", "query", "answer"})),
    RecordFormat("sharegpt", '{"conversations": [{"from", "value"}, ...]}',
                 lambda r: "conversations" in r and not _turn_keys(r) & {"role", "content"},
                 _sharegpt, frozenset({"conversations", "system"})),
    RecordFormat("conversation", '{"conversations": [{"role", "content"}, ...]}',
                 lambda r: "conversations" in r and not _turn_keys(r) & {"from", "value"},
                 _conversation, frozenset({"conversations"})),
]}
KNOWN = "; ".join(f"{f.name} {f.fields}" for f in FORMATS.values())


def prompt_messages(record: dict, fmt: str) -> list[dict[str, str]]:
    """The prompt of a ranking record, whose answers are not part of it, as messages: read by
    the parser of the supervised format `fmt` (alpaca: its system, history, instruction and
    input; sharegpt and conversation: its turns), every text non-empty. `BadRecord` names the
    field (tasks/data/preferences.py)."""
    turns = FORMATS[fmt].convert({**record, "output": ""} if fmt == "alpaca" else record)
    if fmt == "alpaca":
        turns = turns[:-1]                      # the placeholder answer
    for _, text, where, _ in turns:
        if not text.strip():
            raise BadRecord("empty-text", where, "is empty (or only white space)")
    return [{"role": role, "content": text} for role, text, _, _ in turns]


def _check_turns(turns: list[Turn], max_chars: int) -> None:
    """Texts non-empty and not too long; optional system turn, then user/assistant
    alternating, ending on an assistant turn."""
    for role, text, where, _ in turns:
        if not text or text.isspace():
            raise BadRecord("empty-text", where, "is empty (or only white space)")
        if len(text) > max_chars:
            raise BadRecord("too-long", where, f"is {len(text):,} characters long, more than "
                                               f"max_chars={max_chars:,}")
    body = turns[1:] if turns and turns[0][0] == "system" else turns
    if not body:
        raise BadRecord("no-turns", "", "has no user/assistant turns")
    for i, (role, _, text_at, role_at) in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise BadRecord("turn-order", role_at or text_at, f"is {_an(role)} turn where "
                            f"{_an(want)} turn is expected (an optional system turn first, then "
                            "user and assistant alternating)")
    if body[-1][0] != "assistant":
        raise BadRecord("ends-on-user", body[-1][2], "the conversation ends on a user turn "
                                                     "(there is no answer to learn from)")


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
            rec = _object(rec, "")
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
                    raise DataError(path, f"this is {_an(candidates[0])} record, but the data "
                                    f"set's format is {fmt} (from {origin}): a file or "
                                    "directory must hold one format", json_path=prefix,
                                    **here.fields())
                else:
                    raise BadRecord("missing-field", "", f"is not a {fmt} record "
                                    f"{FORMATS[fmt].fields}: it has the fields "
                                    f"{', '.join(rec) or 'none'}")
            turns = FORMATS[fmt].convert(rec)
            _check_turns(turns, max_chars)
        except BadRecord as bad:
            issues.report(bad.kind, DataError(path, bad.reason, json_path=prefix + bad.where,
                                              **here.fields()))
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
