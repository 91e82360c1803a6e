"""The cached Prefect task of each stage, made from its entry.

A stage is declared where its core is: the entry, a function of the stage's module in `tasks/`,
carries `@stage_entry(StageName.X, ...)` (tasks/runtime/results.py), and the flows run it with
`run.stage(entry, **inputs)` (flows/running.py). `stage_task` makes the task once per entry:
named after the stage, keyed as flows/caching.py says, its result persisted as JSON, and on a
GPU run in a process of its own when the entry asks (`own_process`). `tasks/` never imports
Prefect: the cores run in pytest, notebooks and on the GPU machine, where it is not installed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from flows.caching import stage_cache_policy
from flows.results import StageResultSerializer
from tasks.runtime.results import StageResult, declared

Entry = Callable[..., StageResult]


@functools.cache
def stage_task(entry: Entry) -> Task:
    """The Prefect task of stage entry `entry` (one per entry: its options are its
    declaration's)."""
    how = declared(entry)

    @functools.wraps(entry)            # Prefect reads the entry's signature through __wrapped__
    def run(*args: Any, **kwargs: Any) -> StageResult:
        if how.own_process:
            return in_own_process(entry, *args, **kwargs)
        return entry(*args, **kwargs)

    run.__qualname__ = how.name.value  # Prefect's task key: its qualname and code, one per stage
    if not how.cached:
        return task(run, name=how.name.value, cache_policy=NO_CACHE)
    return task(run, name=how.name.value, persist_result=True, log_prints=how.log_prints,
                result_serializer=StageResultSerializer(),
                cache_policy=stage_cache_policy(entry.__module__, how))


def in_own_process(core: Entry, /, *args: Any, **kwargs: Any) -> StageResult:
    """`core(*args, **kwargs)`; where there is a GPU, in a fresh process
    (tasks/runtime/child_process.py), so that the flow process never holds a model and each
    stage's host memory peak is its own (docs/gpu.md "At 6 B on one GPU"). On a CPU (the tiny
    default) here: no start-up cost."""
    from tasks.runtime import child_process
    from tasks.model.modeling import pick_device

    if pick_device("auto").startswith("cuda"):
        return child_process.call(core, *args, **kwargs)
    return core(*args, **kwargs)


def logged_folder(entry: Entry) -> str | None:
    """The folder the stage's MLflow child run holds its output under, if it declares one
    (`Declared.logged_as`)."""
    return declared(entry).logged_as


def child_run_artifacts(entry: Entry, result: StageResult) -> dict[str, str]:
    """What the MLflow child run of the stage holds: its output folder under the name the
    stage declares, else its result's files."""
    folder = logged_folder(entry)
    return {folder: result.path} if folder else dict(result.files)

