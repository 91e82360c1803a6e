"""Content-addressed cache keys for the stage tasks (Prefect edge).

Prefect's INPUTS policy hashes a path as a string and TASK_SOURCE hashes only the task
function's own source. Our key covers what really determines a stage's output:

* every input by content: a `Path` by its bytes (a touched but unchanged file keeps its key;
  the digest is memoised by the file's stat, so an unchanged input is not read again), a
  `StageResult` by its output digest, a pydantic config by its JSON;
* the code of the stage module **and every `tasks.*` module it imports, transitively**, read
  from disk as a syntax tree (so editing a helper module recomputes the stages that use it, and
  only those; a comment or formatting change recomputes nothing);
* the stage's name (its entry, declared in that module, is covered by the module's code);
* the versions of the libraries that shape model outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from prefect.cache_policies import CacheKeyFnPolicy, CachePolicy
from pydantic import BaseModel

from flows.results import cache_key_storage
from tasks.runtime.code_version import code_digest
from tasks.runtime.results import Declared, StageResult
from tasks.runtime.files import file_lock
from tasks.runtime.digest_memo import memo_digest_path

#: the libraries every model stage's output depends on (a stage adds its own: `extra_libs`)
MODEL_LIBS = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "sentencepiece")


@lru_cache(maxsize=None)
def _lib_versions(libs: tuple[str, ...]) -> str:
    out = []
    for lib in libs:
        try:
            out.append(f"{lib}=={importlib.metadata.version(lib)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{lib}==absent")
    return ",".join(out)


def _path_content(path: Path) -> dict[str, str]:
    try:
        return {"path-digest": memo_digest_path(path)}
    except OSError as e:                    # the stage itself says what is wrong with the input
        return {"unreadable-path": str(path), "error": type(e).__name__}


def _path_stat(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except OSError:
        return {"path": str(path)}
    return {"path": str(path), "size": st.st_size, "mtime": st.st_mtime_ns}


def fingerprint(value: Any, path_key: Callable[[Path], Any] = _path_content) -> Any:
    """A JSON-able stand-in for a task input that changes exactly when its content does."""
    if isinstance(value, StageResult):
        return {"stage": value.stage, "digest": value.digest}
    if isinstance(value, Path):
        return path_key(value)
    if isinstance(value, BaseModel):
        return fingerprint(value.model_dump(mode="python"), path_key)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):   # e.g. a ModelSpec
        return fingerprint(dataclasses.asdict(value), path_key)
    if isinstance(value, dict):
        return {str(k): fingerprint(v, path_key)
                for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [fingerprint(v, path_key) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def inputs_lock(stage: str, parameters: dict[str, Any]):
    """A file lock for computing `stage` on these inputs (files by path, size and mtime: cheap),
    so that two runs started together compute it once: the second waits, then finds the first
    one's result in the cache. 256 lock files per stage; two input sets sharing one only wait
    for each other."""
    blob = json.dumps(fingerprint(parameters, _path_stat), sort_keys=True, default=str)
    return file_lock(f"stage-{stage}-{hashlib.blake2b(blob.encode()).hexdigest()[:2]}")


def stage_key(module: str, parameters: dict[str, Any], *, stage: str = "",
              model_libs: bool = False, extra_libs: tuple[str, ...] = ()) -> str:
    """The cache key of stage `stage`, whose entry is in `module`, on these task parameters;
    the versions of MODEL_LIBS (`model_libs`) and of `extra_libs`. The stage's name is part
    of it: two stages of one module (quantize and quantize_torchao) never share a key."""
    payload = {"code": code_digest(module), "inputs": fingerprint(parameters)}
    libs = (MODEL_LIBS if model_libs else ()) + extra_libs
    if libs:
        payload["libs"] = _lib_versions(libs)
    if stage:
        payload["stage"] = stage
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return f"{module.rsplit('.', 1)[-1]}-{hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()}"


def stage_cache_policy(module: str, how: Declared) -> CachePolicy:
    """Cache policy for the task of a stage entry in `module` (e.g. "tasks.data.ingest"),
    declared as `how`, its records kept where only plain-JSON stage results are read back
    (flows/results.py). `how.ignore`: parameters that do not shape the output."""
    return CacheKeyFnPolicy(
        cache_key_fn=lambda _ctx, parameters: stage_key(
            module, {k: v for k, v in parameters.items() if k not in how.ignore},
            stage=how.name.value, model_libs=how.model_libs, extra_libs=how.extra_libs)
    ).configure(key_storage=cache_key_storage())
