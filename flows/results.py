"""Prefect's stage results as plain JSON, never pickles (docs/design.md "Failure modes").

A cache hit needs nothing but the stage's `StageResult` record (paths, digests, the typed
output): the files themselves stay in outputs/. Prefect persists task results with cloudpickle
by default, and its result records name their own serializer, so whoever can write to the
result storage could make every later run unpickle (execute) what they wrote -- whatever
serializer the task asks for.
Here:

* `StageResultSerializer` writes a StageResult as JSON and reads back nothing but a StageResult
  (field by field, type-checked); a failed task's exception is kept as its type name and message;
* each cache key's record (which serializer, where the result is) lives in `CacheKeyStorage`,
  which hands Prefect a record only if it names that serializer and its result parses as a
  StageResult. Anything else -- a pickle, a torn file of a killed run -- reads as "not cached":
  the stage is recomputed and the record overwritten. Records are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import LocalFileSystem
from prefect.serializers import Serializer
from pydantic import Field

from tasks.runtime.results import StageResult
from tasks.runtime.files import atomic_write_bytes

SERIALIZER = "stage-result-json"
_FIELDS = [f.name for f in dataclasses.fields(StageResult)]


class UntrustedRecord(ValueError):
    """A stored record that is not a plain-JSON stage result."""


def _jsonable(value: Any) -> Any:
    """What `json` cannot write on its own: paths (as strings) and numpy scalars."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise UntrustedRecord(f"{what} is {type(value).__name__}")
    return value


def stage_result_from_json(data: Any) -> StageResult:
    """A StageResult from parsed JSON, refusing anything that is not exactly one."""
    if sorted(_expect(data, dict, "the record")) != sorted(_FIELDS):
        raise UntrustedRecord(f"the record has the fields {sorted(data)}")
    for key in ("stage", "path", "digest", "result_id"):
        _expect(data[key], str, key)
    _expect(data["summary"], str, "summary")
    for entry in _expect(data["history"], list, "history"):
        _expect(entry, dict, "history[]")
    for key in ("device", "dtype"):
        _expect(data[key], (str, type(None)), key)
    try:                            # the stage's output: its class and every field's type
        return StageResult.from_json(data)
    except (ValueError, TypeError, ImportError) as e:
        raise UntrustedRecord(f"out: {e}") from None


class StageResultSerializer(Serializer):
    """JSON for StageResult records (and a failed task's exception, as type and message)."""

    type: str = Field(default=SERIALIZER, frozen=True)

    def dumps(self, obj: Any) -> bytes:
        if isinstance(obj, StageResult):
            body: Any = {"stage_result": obj.to_json()}
        elif isinstance(obj, BaseException):
            body = {"exception": type(obj).__name__, "message": str(obj)}
        else:
            raise TypeError(f"a stage task must return a StageResult, not "
                            f"{type(obj).__name__}")
        return json.dumps(body, ensure_ascii=False, default=_jsonable).encode()

    def loads(self, blob: bytes) -> Any:
        try:
            body = json.loads(blob)
        except ValueError as e:
            raise UntrustedRecord(f"not JSON ({e})") from None
        if isinstance(body, dict) and list(body) == ["stage_result"]:
            return stage_result_from_json(body["stage_result"])
        if isinstance(body, dict) and sorted(body) == ["exception", "message"]:
            return RuntimeError(f"{body['exception']}: {body['message']}")
        raise UntrustedRecord("not a stage result")


class CacheKeyStorage(LocalFileSystem):
    """Prefect's cache-key records (`CachePolicy.key_storage`), checked before Prefect sees
    them: the record must name `StageResultSerializer` and its result file (inside
    `results_path`) must parse as a StageResult."""

    _block_type_name = "Pipeline Cache Keys"
    results_path: str = Field(description="Folder of the result files the records point at.")

    def check(self, content: bytes) -> bytes:
        try:
            record = json.loads(content)
            serializer, where = record["serializer"], record["storage_key"]
        except (ValueError, TypeError, KeyError) as e:
            raise UntrustedRecord(f"not a cache record ({type(e).__name__})") from None
        if serializer != {"type": SERIALIZER}:
            raise UntrustedRecord(f"the record names the serializer {serializer!r}; only "
                                  f"{SERIALIZER!r} records are read")
        results = Path(self.results_path).resolve()
        result = Path(str(where)).resolve()
        if results not in result.parents:
            raise UntrustedRecord(f"the record points outside {results}: {result}")
        StageResultSerializer().loads(result.read_bytes())
        return content

    async def aread_path(self, path: str) -> bytes:
        return self.check(await super().aread_path(path))

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return self.check(super().read_path(path, _sync=True))

    async def awrite_path(self, path: str, content: bytes) -> str:
        return str(atomic_write_bytes(self._resolve_path(path), content))

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        return str(atomic_write_bytes(self._resolve_path(path), content))


def results_folder() -> Path:
    """Prefect's local result storage (`PREFECT_LOCAL_STORAGE_PATH`: <project>/.prefect/storage,
    set by flows.ops.startup.prepare)."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().results.local_storage_path)


def cache_key_storage() -> CacheKeyStorage:
    folder = results_folder()
    return CacheKeyStorage(basepath=str(folder / "cache-keys"), results_path=str(folder))
