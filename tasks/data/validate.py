"""Stage 3, validate: every JSON artifact checked against its schema in `schemas/`.

A violation stops the flow with the file, the record index, the JSON path of the offending
value and the reason. Conversations are also checked for turn order (optional system first,
then user/assistant alternating, ending on an assistant turn).

Two paths, one meaning. jsonschema over a million records takes minutes, so a file written one
record per line (as our stages write) is read by pyarrow with the field names and types the
schema implies, and the schema's remaining keywords are compiled into column checks
(`compile_checks`). That fast path only ever *accepts*: when it is unsure (another layout, a
keyword it does not know) or finds a violation, the exact path runs jsonschema on the record
and words the error. So both paths accept exactly the same files.
"""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from jsonschema import Draft202012Validator

from tasks.runtime.paths import SCHEMA_DIR
from tasks.runtime.errors import DataError
from tasks.runtime.results import Metrics, StageName, StageResult, stage_entry, stage_output
from tasks.runtime.files import read_json
from tasks.data.dataset_io import arrow_schema_of, scan_json_records
from tasks.runtime.progress import Progress

if TYPE_CHECKING:       # the outputs this stage reads (not part of its cache key's code)
    from tasks.data.conversations import Conversations
    from tasks.data.ingest import Ingested

SCHEMAS = {"qa": "qa.schema.json", "conversation": "conversation.schema.json",
           "preference": "preference.schema.json"}
Check = Callable[[pa.Array], np.ndarray]          # column -> ok per value
_ANNOTATIONS = {"$schema", "$id", "title", "description"}


@lru_cache(maxsize=None)
def load_schema(kind: str) -> dict:
    schema = json.loads((SCHEMA_DIR / SCHEMAS[kind]).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return schema


@lru_cache(maxsize=None)
def _validator(schema_json: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_json))


# ---------------------------------------------------------------------------------------------
# Fast path: the schema compiled into column checks
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _not_space_class() -> str:
    """An RE2 class matching exactly the characters Python's `re` does not count as \\s, so
    pattern "\\S" means the same in pyarrow (RE2) as in jsonschema (Python `re`)."""
    spaces = [c for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    return "[^" + "".join(f"\\x{{{c:x}}}" for c in spaces) + "]"


def _string_check(schema: dict) -> Check:
    min_length, pattern, enum = schema.get("minLength"), schema.get("pattern"), \
        schema.get("enum")

    def check(arr: pa.Array) -> np.ndarray:
        ok = arr.is_valid()
        if min_length:
            ok = pc.and_(ok, pc.greater_equal(pc.utf8_length(arr), min_length))
        if pattern == r"\S":
            ok = pc.and_(ok, pc.match_substring_regex(arr, _not_space_class()))
        elif pattern is not None:
            found = re.compile(pattern)
            ok = pc.and_(ok, pa.array([s is not None and found.search(s) is not None
                                       for s in arr.to_pylist()]))
        if enum is not None:
            ok = pc.and_(ok, pc.is_in(arr, pa.array(enum, arr.type)))
        return pc.fill_null(ok, False).to_numpy(zero_copy_only=False)
    return check


def compile_checks(schema: dict) -> Check:
    """Column checks equivalent to a JSON Schema over values that pyarrow has already typed
    with `arrow_schema_of` (so "type" and "additionalProperties": false hold). Supports the
    keywords our schemas use; anything else raises NotImplementedError (use jsonschema)."""
    known = {"type", "properties", "required", "additionalProperties", "items", "minItems",
             "minLength", "pattern", "enum"} | _ANNOTATIONS
    if set(schema) - known:
        raise NotImplementedError(f"keywords {sorted(set(schema) - known)}")
    kind = schema.get("type")
    if kind == "object":
        props = schema["properties"]
        # an absent field and a null read alike: only safe when every field is required
        if schema.get("additionalProperties") is not False or \
                set(schema.get("required", [])) != set(props):
            raise NotImplementedError("optional or additional properties")
        fields = {name: compile_checks(sub) for name, sub in props.items()}

        def check_object(arr: pa.Array) -> np.ndarray:
            ok = arr.is_valid().to_numpy(zero_copy_only=False)
            for name, check in fields.items():
                ok &= check(arr.field(name))
            return ok
        return check_object
    if kind == "array":
        items, min_items = compile_checks(schema["items"]), schema.get("minItems", 0)

        def check_array(arr: pa.Array) -> np.ndarray:
            ok = pc.fill_null(pc.greater_equal(pc.list_value_length(arr), min_items),
                              False).to_numpy(zero_copy_only=False)
            bad_items = ~items(arr.flatten())
            ok[pc.list_parent_indices(arr).to_numpy()[bad_items]] = False
            return ok
        return check_array
    if kind == "string" or (kind is None and "enum" in schema):
        if kind is None and not all(isinstance(v, str) for v in schema["enum"]):
            raise NotImplementedError("enum of non-strings")
        return _string_check(schema)
    raise NotImplementedError(f"type {kind!r}")


def turn_order_ok(conversations: pa.Array) -> np.ndarray:
    """Per conversation: optional system turn first, then user/assistant alternating, ending
    on an assistant turn (vectorized `_turn_error`; other roles or nulls count as wrong)."""
    lengths = pc.fill_null(pc.list_value_length(conversations), 0).to_numpy(
        zero_copy_only=False)
    turns_ = conversations.flatten()
    code = np.where(turns_.is_valid().to_numpy(zero_copy_only=False), pc.fill_null(
        pc.index_in(turns_.field("role"), pa.array(["system", "user", "assistant"])), -1)
        .to_numpy(zero_copy_only=False), -1)
    parent = pc.list_parent_indices(conversations).to_numpy()
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    nonempty = lengths > 0
    has_system = np.zeros(len(lengths), bool)
    has_system[nonempty] = code[starts[nonempty]] == 0
    body_pos = np.arange(len(code)) - starts[parent] - has_system[parent]
    wrong = (body_pos >= 0) & (code != np.where(body_pos % 2 == 0, 1, 2))
    ok = nonempty & (lengths - has_system >= 1)
    ok[nonempty] &= code[(starts + lengths - 1)[nonempty]] == 2
    ok[parent[wrong]] = False
    return ok


def _fast_ok(path: Path, kind: str) -> np.ndarray | None:
    """Per record: does it satisfy schema `kind` (and, for conversations, the turn order)?
    None when the file cannot be read on the fast path."""
    schema = load_schema(kind)
    check = compile_checks(schema["items"])
    ok: list[np.ndarray] = []

    def each(batch: pa.RecordBatch) -> None:
        rows = batch.to_struct_array()
        good = check(rows)
        if kind == "conversation":
            good &= turn_order_ok(rows.field("conversations"))
        ok.append(good)
    if scan_json_records(path, arrow_schema_of(schema), each) is None:
        return None
    return np.concatenate(ok) if ok else np.zeros(0, bool)


# ---------------------------------------------------------------------------------------------
# Exact path: jsonschema (and the turn order in plain Python)
# ---------------------------------------------------------------------------------------------
def _turn_error(path: Path, i: int, record: dict) -> DataError | None:
    roles = [t["role"] for t in record["conversations"]]
    body = roles[1:] if roles[0] == "system" else roles
    for j, role in enumerate(body):
        want = "user" if j % 2 == 0 else "assistant"
        if role != want:
            k = j + (len(roles) - len(body))
            return DataError(path, f"turn {k} has role {role!r}, expected {want!r} (an "
                                   "optional system turn, then user/assistant alternating)",
                             record=i, json_path=f"$[{i}].conversations[{k}].role")
    if not body or body[-1] != "assistant":
        return DataError(path, "conversation does not end on an assistant turn (nothing to "
                               "learn from its last user turn)", record=i,
                         json_path=f"$[{i}].conversations")
    return None


def _record_error(path: Path, kind: str, i: int, record: object) -> DataError | None:
    items = _validator(json.dumps(load_schema(kind)["items"]))
    error = next(iter(sorted(items.iter_errors(record), key=lambda e: list(e.absolute_path))),
                 None)
    if error is not None:
        return DataError(path, error.message, record=i, json_path=f"$[{i}]"
                         + error.json_path[1:])
    return _turn_error(path, i, record) if kind == "conversation" else None


def _load(path: Path) -> object:
    try:
        return orjson.loads(Path(path).read_bytes())
    except orjson.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg}", line=e.lineno) from None


def _exact(path: Path, kind: str, first_suspect: int = 0) -> int:
    """jsonschema on the file (from record `first_suspect`, which the fast path found bad,
    when it did): raises the first violation as a DataError; returns the record count."""
    records = _load(path)
    top = dict(load_schema(kind), items=True)            # the array itself: type, minItems
    error = next(iter(Draft202012Validator(top).iter_errors(records)), None)
    if error is not None:
        raise DataError(path, error.message, json_path=error.json_path)
    for i in range(first_suspect, len(records)):
        if (problem := _record_error(path, kind, i, records[i])) is not None:
            raise problem
    return len(records)


@stage_output
class Validated:
    """Each file's valid records ("<name>_valid_records"), the schema it was held to and how."""

    valid_records: Metrics
    schemas: dict[str, str]
    validated_by: dict[str, str]


def validate_file(path: Path, kind: str) -> int:
    """Validate one JSON file against schema `kind` ("qa" | "conversation"); return #records."""
    return check_file(path, kind)[0]


def check_file(path: Path, kind: str) -> tuple[int, str]:
    """`validate_file`, also saying which path accepted the file: "fast" or "exact"."""
    path = Path(path)
    schema = load_schema(kind)
    try:
        ok = _fast_ok(path, kind)
    except NotImplementedError:
        ok = None
    if ok is not None and ok.all() and len(ok) >= schema.get("minItems", 0):
        return len(ok), "fast"
    suspect = int(np.argmin(ok)) if ok is not None and not ok.all() else 0
    return _exact(path, kind, suspect), "exact"


def validate(files: dict[str, tuple[Path, str]]) -> StageResult:
    """Validate named files, `{name: (path, kind)}`; fails on the first violation."""
    checked = {}
    with Progress("validate", total=len(files)) as progress, \
            ThreadPoolExecutor(2) as pool:         # pyarrow parses without the GIL; 2 files at
                                                   # a time bound the memory
        for name, result in zip(files, pool.map(lambda f: check_file(*f), files.values())):
            checked[name] = result
            progress.update(note=f"{name}: {result[0]:,} records")
    counts = {name: n for name, (n, _) in checked.items()}
    paths = {name: how for name, (_, how) in checked.items()}
    folder = Path(next(iter(files.values()))[0]).parent
    return StageResult(stage=StageName.VALIDATE, path=str(folder), digest="", out=Validated(
        valid_records={f"{name}_valid_records": float(n) for name, n in counts.items()},
        schemas={name: SCHEMAS[kind] for name, (_, kind) in files.items()},
        validated_by=paths))


def validate_data(ingested: Ingested, data: Conversations) -> StageResult:
    """The stage on what ingest and conversations made: qa.json (when every record was one Q/A
    pair), train.json and dev.json, each against its schema."""
    qa = {"qa": (ingested.qa_json, "qa")} if ingested.qa_json else {}
    return validate({**qa, "train": (data.train_json, "conversation"),
                     "dev": (data.dev_json, "conversation")})


@stage_entry(StageName.VALIDATE)
def stage(qa: StageResult, data: StageResult) -> StageResult:
    """The stage over the ingest and conversations stages' results."""
    return validate_data(qa.out, data.out)


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """The turn lists of a ChatGLM3 conversation file, validated against its schema (file,
    record and JSON path named on error)."""
    validate_file(Path(path), "conversation")
    return [rec["conversations"] for rec in read_json(path)]
