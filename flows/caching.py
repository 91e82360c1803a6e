"""Content-addressed cache keys for the stage tasks (Prefect edge).

Prefect's INPUTS policy hashes a path as a string and TASK_SOURCE hashes only the task
function's own source. Our key covers what really determines a stage's output:

* every input by content: a `Path` by its bytes (a touched but unchanged file keeps its key;
  the digest is memoised by the file's stat, so an unchanged input is not read again), a
  `StageResult` by its output digest, a pydantic config by its JSON;
* the code of the stage module **and every `tasks.*` module it imports, transitively**, read
  from disk as a syntax tree (so editing a helper module recomputes the stages that use it, and
  only those; a comment or formatting change recomputes nothing);
* the versions of the libraries that shape model outputs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import CacheKeyFnPolicy, CachePolicy
from pydantic import BaseModel

from tasks.code_version import code_digest
from tasks.common import StageResult
from tasks.digest_memo import memo_digest_path

MODEL_LIBS = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "sentencepiece")


@lru_cache(maxsize=None)
def _lib_versions() -> str:
    out = []
    for lib in MODEL_LIBS:
        try:
            out.append(f"{lib}=={importlib.metadata.version(lib)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{lib}==absent")
    return ",".join(out)


def fingerprint(value: Any) -> Any:
    """A JSON-able stand-in for a task input that changes exactly when its content does."""
    if isinstance(value, StageResult):
        return {"stage": value.stage, "digest": value.digest}
    if isinstance(value, Path):
        return {"path-digest": memo_digest_path(value)}
    if isinstance(value, BaseModel):
        return fingerprint(value.model_dump(mode="python"))
    if isinstance(value, dict):
        return {str(k): fingerprint(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [fingerprint(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def stage_key(module: str, parameters: dict[str, Any], *, model_libs: bool = False) -> str:
    payload = {"code": code_digest(module), "inputs": fingerprint(parameters)}
    if model_libs:
        payload["libs"] = _lib_versions()
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return f"{module.rsplit('.', 1)[-1]}-{hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()}"


def stage_cache_policy(module: str, *, model_libs: bool = False) -> CachePolicy:
    """Cache policy for a task wrapping the core of `module` (e.g. "tasks.ingest")."""
    return CacheKeyFnPolicy(
        cache_key_fn=lambda _ctx, parameters: stage_key(module, parameters,
                                                        model_libs=model_libs))
