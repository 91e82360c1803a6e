"""Stage 3, validate: every JSON artifact checked against its schema in `schemas/`.

A violation stops the flow with the file, the record index, the JSON path of the offending
value and the reason. Conversations are also checked for turn order (optional system first,
then user/assistant alternating, ending on an assistant turn).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from jsonschema import Draft202012Validator

from tasks.common import SCHEMA_DIR, DataError, StageResult, read_json

SCHEMAS = {"qa": "qa.schema.json", "conversation": "conversation.schema.json"}


@lru_cache(maxsize=None)
def _validator(kind: str) -> Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / SCHEMAS[kind]).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _check_turns(path: Path, records: list) -> None:
    for i, rec in enumerate(records):
        roles = [t["role"] for t in rec["conversations"]]
        body = roles[1:] if roles[0] == "system" else roles
        for j, role in enumerate(body):
            want = "user" if j % 2 == 0 else "assistant"
            if role != want:
                k = j + (len(roles) - len(body))
                raise DataError(path, f"turn {k} has role {role!r}, expected {want!r} (an "
                                      "optional system turn, then user/assistant alternating)",
                                record=i, json_path=f"$[{i}].conversations[{k}].role")
        if not body or body[-1] != "assistant":
            raise DataError(path, "conversation does not end on an assistant turn (nothing to "
                                  "learn from its last user turn)", record=i,
                            json_path=f"$[{i}].conversations")


def validate_file(path: Path, kind: str) -> int:
    """Validate one JSON file against schema `kind` ("qa" | "conversation"); return #records."""
    path = Path(path)
    try:
        records = read_json(path)
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg}", line=e.lineno) from None
    error = next(iter(sorted(_validator(kind).iter_errors(records),
                             key=lambda e: list(e.absolute_path))), None)
    if error is not None:
        where = list(error.absolute_path)
        record = where[0] if where and isinstance(where[0], int) else None
        raise DataError(path, error.message, record=record, json_path=error.json_path)
    if kind == "conversation":
        _check_turns(path, records)
    return len(records)


def validate(files: dict[str, tuple[Path, str]]) -> StageResult:
    """Validate named files, `{name: (path, kind)}`; fails on the first violation."""
    counts = {name: validate_file(path, kind) for name, (path, kind) in files.items()}
    return StageResult(stage="validate", path=str(Path(next(iter(files.values()))[0]).parent),
                       digest="", metrics={f"{name}_valid_records": float(n)
                                           for name, n in counts.items()},
                       info={"schemas": {name: SCHEMAS[kind] for name, (_, kind) in
                                         files.items()}})
