"""Columnar data sets: the Arrow shape of QA and conversation records, and fast JSON/Parquet I/O.

Every data stage keeps its records as a pyarrow table (one column per field, nested for turns),
so a million pairs never become a million Python dicts. This module turns such a table into
the JSON files the fine-tuning tools read (one record per line inside a JSON array, UTF-8,
standard-library escaping) and reads files of that layout back through pyarrow's JSON reader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.json as pj
import pyarrow.parquet as pq

TEXT = pa.large_string()
TURN = pa.struct([("role", TEXT), ("content", TEXT)])
#: ChatGLM3 conversation records: `{"conversations": [{"role", "content"}, ...]}`
CONVERSATIONS = pa.schema([("conversations", pa.large_list(TURN))])
#: the QA JSON of raw Q/A text: `{"q", "a"}`
QA = pa.schema([("q", TEXT), ("a", TEXT)])

_CHUNK = 1 << 16                      # records per JSON write chunk (bounds the memory used)


def lit(s: str) -> pa.Scalar:
    return pa.scalar(s, TEXT)


def text_array(values) -> pa.Array:
    return pa.array(values, TEXT)


# ---------------------------------------------------------------------------------------------
# Building conversation arrays
# ---------------------------------------------------------------------------------------------
def conversations_array(offsets: np.ndarray, roles: pa.Array, contents: pa.Array) -> pa.Array:
    """`list<struct<role, content>>` from flat turn columns and list offsets (n + 1 ints)."""
    turns = pa.StructArray.from_arrays([roles.cast(TEXT), contents.cast(TEXT)],
                                       fields=list(TURN))
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), turns)


def pair_conversations(texts: pa.Array) -> pa.Array:
    """Conversations of one user and one assistant turn from texts q0, a0, q1, a1, ..."""
    n = len(texts) // 2
    roles = text_array(["user", "assistant"]).take(np.tile(np.array([0, 1]), n))
    return conversations_array(np.arange(0, 2 * n + 1, 2), roles, texts)


def single(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A table column as one array (no copy when it has one chunk)."""
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def turns(conversations: pa.Array) -> tuple[np.ndarray, pa.Array, pa.Array]:
    """(offsets rebased to 0, roles, contents) of a conversations array (a slice is fine)."""
    arr = single(conversations)
    offsets = arr.offsets.to_numpy()
    values = arr.values.slice(offsets[0], offsets[-1] - offsets[0])
    return offsets - offsets[0], values.field("role"), values.field("content")


def is_qa(conversations: pa.Array) -> bool:
    """Is every conversation exactly one user turn and one assistant turn?"""
    offsets, roles, _ = turns(conversations)
    n = len(offsets) - 1
    return bool(n and np.all(np.diff(offsets) == 2) and pc.all(pc.equal(
        roles, text_array(["user", "assistant"]).take(np.tile(np.array([0, 1]), n)))).as_py())


def qa_json(rows: pa.Array) -> pa.Array:
    """JSON `{"q", "a"}` of each row of a conversations struct array for which `is_qa`."""
    offsets, _, contents = turns(rows.field("conversations"))
    pairs = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), _quote(contents))
    return pc.binary_join_element_wise(lit('{"q":'), pc.binary_join(pairs, lit(',"a":')),
                                       lit("}"), lit(""))


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------
def string_bytes(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, UTF-8 bytes) of a large_string array, zero-copy."""
    offsets = np.frombuffer(strings.buffers()[1], np.int64)[
        strings.offset:strings.offset + len(strings) + 1]
    data = strings.buffers()[2]
    return offsets, np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)


def needs_escape(strings: pa.Array) -> np.ndarray:
    """Which strings hold a character JSON must escape: '"', '\\' or a control character
    below U+0020. In UTF-8 these bytes never occur inside a multi-byte character, so a scan of
    the bytes finds them exactly (and far faster than a regex over every string)."""
    offsets, data = string_bytes(strings)
    data = data[offsets[0]:offsets[-1]]
    hits = np.flatnonzero((data < 0x20) | (data == 0x22) | (data == 0x5C)) + offsets[0]
    flags = np.zeros(len(strings), bool)
    flags[np.searchsorted(offsets, hits, side="right") - 1] = True
    return flags


def _quote(strings: pa.Array) -> pa.Array:
    """Each string as a JSON string literal. Strings with characters JSON must escape go
    through the standard library's encoder; all others are copied as they are."""
    strings = strings.cast(TEXT)
    if strings.null_count:
        raise ValueError("cannot write null strings as JSON")
    if len(strings) > 1000 and strings.nbytes < 16 * len(strings):
        # short strings (roles, labels) are mostly repeats: quote each distinct one once
        coded = pc.dictionary_encode(strings)
        if len(coded.dictionary) * 10 < len(strings):
            return _quote(coded.dictionary).take(coded.indices)
    special = needs_escape(strings)
    if special.any():
        escaped = [json.dumps(s, ensure_ascii=False)[1:-1]
                   for s in strings.filter(special).to_pylist()]
        strings = pc.replace_with_mask(strings, pa.array(special), text_array(escaped))
    return pc.binary_join_element_wise(lit('"'), strings, lit('"'), lit(""))


def json_values(arr: pa.Array) -> pa.Array:
    """The JSON text of every value of a (nested) string / struct / list array, compact."""
    if arr.null_count:
        raise ValueError("cannot write null values as JSON records")
    kind = arr.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _quote(arr)
    if pa.types.is_struct(kind):
        parts = []
        for i, f in enumerate(kind):
            parts += [lit(("{" if i == 0 else ",") + json.dumps(f.name) + ":"),
                      json_values(arr.field(i))]
        return pc.binary_join_element_wise(*parts, lit("}"), lit(""))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        offsets = arr.offsets.to_numpy()
        inner = json_values(arr.values.slice(offsets[0], offsets[-1] - offsets[0]))
        joined = pc.binary_join(pa.LargeListArray.from_arrays(
            pa.array(offsets - offsets[0], pa.int64()), inner), lit(","))
        return pc.binary_join_element_wise(lit("["), joined, lit("]"), lit(""))
    raise TypeError(f"no JSON writer for Arrow type {kind}")


def write_json_records(path: Path, table: pa.Table,
                       render: Callable[[pa.Array], pa.Array] = json_values) -> Path:
    """Write a table as a JSON array with one compact record per line (UTF-8, no escaping of
    non-ASCII), atomically. Memory stays bounded: records are encoded in chunks, each by
    `render` (rows as a struct array -> JSON text per row)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            if table.num_rows == 0:
                f.write(b"[]\n")
            for start in range(0, table.num_rows, _CHUNK):
                chunk = table.slice(start, _CHUNK).combine_chunks()
                records = render(pa.StructArray.from_arrays(
                    [column.chunk(0) for column in chunk.columns], names=chunk.column_names))
                body = pc.binary_join(pa.LargeListArray.from_arrays(
                    pa.array([0, len(records)], pa.int64()), records), lit(",\n"))
                f.write(b"[\n" if start == 0 else b",\n")
                f.write(body[0].as_buffer())
            if table.num_rows:
                f.write(b"\n]\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def arrow_schema_of(json_schema: dict) -> pa.Schema:
    """The Arrow schema that a JSON Schema of an array of objects describes (strings, enums of
    strings, objects and arrays), used to read such files with pyarrow."""
    def kind(s: dict) -> pa.DataType:
        if s.get("type") == "object":
            return pa.struct([(k, kind(v)) for k, v in s["properties"].items()])
        if s.get("type") == "array":
            return pa.list_(kind(s["items"]))       # the JSON reader has no large lists
        if s.get("type") == "string" or all(isinstance(v, str) for v in s.get("enum", [0])):
            return TEXT
        raise NotImplementedError(f"no Arrow type for JSON Schema {s}")
    return pa.schema(list(kind(json_schema["items"])))


def scan_json_records(path: Path, schema: pa.Schema,
                      each: Callable[[pa.RecordBatch], None]) -> int | None:
    """Stream a JSON array written one record per line (our layout) through pyarrow's JSON
    reader, block by block, with the field names and types of `schema` enforced (an unknown
    field or a wrong type fails); call `each` on every block; return the number of records.

    Returns None when the file has another layout or pyarrow refuses it; callers then use the
    exact (slow) path, so this never decides that a file is invalid, only that it parsed."""
    buf = np.fromfile(path, np.uint8)                 # writable: separators are blanked below
    if len(buf) < 6 or bytes(buf[:3]) != b"[\n{" or bytes(buf[-4:]) != b"}\n]\n":
        return None
    newlines = np.flatnonzero(buf == ord("\n"))
    # raw newlines never occur inside JSON strings: in our layout they are "[\n", "},\n{"
    # between records, and "\n]\n" at the end
    separators = newlines[1:-2]
    if newlines[0] != 1 or newlines[-2] != len(buf) - 3 or not (
            np.all(buf[separators - 1] == ord(",")) and np.all(buf[separators - 2] == ord("}"))
            and np.all(buf[separators + 1] == ord("{"))):
        return None
    buf[separators - 1] = ord(" ")                    # JSON array -> JSON Lines, in place
    rows = 0
    try:
        reader = pj.open_json(pa.BufferReader(pa.py_buffer(buf[2:-3])),
                              read_options=pj.ReadOptions(block_size=16 << 20),
                              parse_options=pj.ParseOptions(explicit_schema=schema,
                                                            unexpected_field_behavior="error"))
        for batch in reader:
            each(batch)
            rows += batch.num_rows
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return None
    # every line starts with "{", so it holds at least one object; as many rows as lines means
    # each holds exactly one
    return rows if rows == len(separators) + 1 else None


def read_json_records(path: Path, schema: pa.Schema) -> pa.Table | None:
    """`scan_json_records` into one table (None: another layout, or refused by pyarrow)."""
    batches: list[pa.RecordBatch] = []
    rows = scan_json_records(path, schema, batches.append)
    return None if rows is None else pa.Table.from_batches(batches, schema)


# ---------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------
def write_parquet(path: Path, table: pa.Table) -> Path:
    """Parquet copy (loads with `datasets.load_dataset("parquet", ...)` or pandas)."""
    pq.write_table(table, path, compression="zstd")
    return Path(path)


def read_parquet(path: Path) -> pa.Table:
    return pq.read_table(path)


def write_arrow(path: Path, table: pa.Table) -> Path:
    """Arrow IPC (Feather v2) file: how stages hand tables to each other (no parsing)."""
    feather.write_feather(table, path, compression="lz4")
    return Path(path)


def read_arrow(path: Path) -> pa.Table:
    return feather.read_table(path)
