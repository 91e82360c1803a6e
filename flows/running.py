"""Running the stages: each under its inputs lock, a cache hit verified against its outputs,
logged as an MLflow child run of one parent run per flow run, with a summary row (README
"Where to look"). Each stage is its entry, declared in its module of `tasks/`; its Prefect
task is made in flows/stages.py."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout
from mlflow.entities import Metric
from prefect import Task, get_run_logger
from prefect.runtime import flow_run

from flows.caching import inputs_lock
from flows.mlflow_files import DatasetFile
from flows.ops import hygiene, startup
from flows.ops.signals import as_raised_by_signal
from flows.stages import Entry, child_run_artifacts, stage_task
from flows.tracking import Tracker
from tasks.runtime.errors import DataError
from tasks.runtime.results import StageResult
from tasks.runtime.resources import peak_memory, thaw


@dataclass(frozen=True)
class StageRun:
    """How a stage went: its result, whether it was served from the cache, how long it took,
    and why a cached result was not trusted (its outputs changed on disk, or an upstream stage
    was recomputed for that reason)."""

    result: StageResult
    cached: bool
    seconds: float
    invalidated: str | None = None


def run_cached(stage: Task, *, distrust: str | None = None, **kwargs: Any) -> StageRun:
    """Run a stage task under its inputs lock. A cache hit is verified against the manifests of
    its outputs; a hit that fails (or any hit, when `distrust` gives a reason) is recomputed."""
    start = time.perf_counter()
    with _waiting_for(inputs_lock(stage.name, kwargs), stage.name):
        runner = stage.with_options(refresh_cache=True) if distrust else stage
        state = runner(**kwargs, return_state=True)
        result: StageResult = state.result()
        cached = state.name == "Cached"
        problem = result.problem() if cached else None
        if problem:
            get_run_logger().warning("stage %s: the cached result is not trusted, recomputing: "
                                     "%s", stage.name, problem)
            state = stage.with_options(refresh_cache=True)(**kwargs, return_state=True)
            result, cached = state.result(), False
    return StageRun(result, cached, time.perf_counter() - start, problem or distrust)


@contextmanager
def _waiting_for(lock: FileLock, stage: str) -> Iterator[None]:
    """Hold `lock`; if another run holds it, say so and wait."""
    try:
        lock.acquire(timeout=0)
    except Timeout:
        get_run_logger().info("stage %s: another run is computing it on the same inputs; "
                              "waiting for it (its result will be a cache hit here)", stage)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _mentions(value: Any, mark: str) -> bool:
    """Whether a task argument carries a result whose result_id or path is `mark`, or the path
    itself (the model specs of benchmark and report)."""
    if isinstance(value, StageResult):
        return mark in (value.result_id, value.path)
    if isinstance(value, dict):
        return any(_mentions(v, mark) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_mentions(v, mark) for v in value)
    return isinstance(value, (str, Path)) and str(value) == mark


@dataclass
class PipelineRun:
    """Runs stages, logs each as an MLflow child run, and keeps the rows of the summary."""

    tracker: Tracker
    parent_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)    # stage -> run holding artifacts
    steps: list[dict[str, Any]] = field(default_factory=list)  # uncached steps (`step`)
    first_stage_at: float | None = None              # time.perf_counter() the first began
    #: results recomputed because their cache was invalidated (result id or path -> stage):
    #: every stage fed by one of them is recomputed too
    recomputed: dict[str, str] = field(default_factory=dict)

    def stage(self, entry: Entry, *,
              artifacts: Callable[[StageResult], dict[str, str]] | None = None,
              datasets: Callable[[StageResult], dict[str, Path | DatasetFile]] = lambda r: {},
              params: dict[str, Any] | None = None,
              **kwargs: Any) -> StageResult:
        """Run the stage whose entry is `entry` on `kwargs` (cached), log it as an MLflow child
        run with its artifacts (`child_run_artifacts`, unless `artifacts` says), datasets and
        params."""
        made = stage_task(entry)
        name, start = made.name, time.perf_counter()
        artifacts = artifacts or partial(child_run_artifacts, entry)
        self.first_stage_at = self.first_stage_at or start
        upstream = next((stage for mark, stage in self.recomputed.items()
                         if _mentions(kwargs, mark)), None)
        distrust = upstream and f"upstream stage {upstream} was recomputed (its cache was " \
                                "invalidated)"
        try:
            with peak_memory() as peaks:
                run = run_cached(made, distrust=distrust, **kwargs)
        except BaseException as error:
            if isinstance(error, DataError) and error.stage is None:
                error.stage = name
            _best_effort(self.tracker.log_failure, name, error)
            raise
        result = run.result
        if run.invalidated:
            self.recomputed |= {result.result_id: name, result.path: name}
        usage = {"stage_peak_rss_mib": peaks.rss_mib,
                 **{f"stage_phase_seconds.{k}": v for k, v in peaks.phases.items()}}
        if peaks.cuda_mib is not None:
            usage["stage_peak_cuda_mib"] = peaks.cuda_mib
        _, origin = self.tracker.log_stage(result, cached=run.cached, seconds=run.seconds,
                                           params=params, artifacts=artifacts(result),
                                           datasets=datasets(result), extra_metrics=usage,
                                           invalidated=run.invalidated)
        self.origins[name] = origin
        self.rows.append({"stage": name, "cached": run.cached, "seconds": run.seconds,
                          "from_run": origin, "invalidated": run.invalidated,
                          "device": result.device,
                          "peak_rss_mib": peaks.rss_mib, "peak_cuda_mib": peaks.cuda_mib,
                          "phases": peaks.phases, "total_seconds": time.perf_counter() - start})
        how = f"recomputed ({run.invalidated})" if run.invalidated else \
            "cache hit" if run.cached else "computed"
        cuda = "" if peaks.cuda_mib is None else f", peak CUDA {peaks.cuda_mib:,.0f} MiB"
        print(f"[stage] {name}: {how} in {run.seconds:.1f} s"
              f"{' on ' + result.device if result.device else ''}, peak "
              f"RSS {peaks.rss_mib:,.0f} MiB{cuda}", flush=True)
        return result

    def timings(self) -> dict[str, float]:
        """Where the run's time went, as metrics of the parent run: each stage including its
        MLflow logging (`stage_total_seconds.<stage>`) and, for a command-line run, the time
        from the process's start to its first stage (`startup_seconds`), of which the
        temporary Prefect server took `server_start_seconds` to boot and kept the run waiting
        `server_wait_seconds` (see flows/ops/startup.py)."""
        out = {f"stage_total_seconds.{r['stage']}": r["total_seconds"] for r in self.rows}
        if startup.cli_flow() and self.first_stage_at:
            out["startup_seconds"] = startup.process_seconds() - (time.perf_counter()
                                                                  - self.first_stage_at)
        if (server := startup.temporary_server()) and server.ready_seconds is not None:
            out |= {"server_start_seconds": server.ready_seconds,
                    "server_wait_seconds": server.waited_seconds}
        return out

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run an uncached step that is not a stage task (e.g. register); its row (seconds and
        peak memory, like a stage's) goes to `steps`."""
        start = time.perf_counter()
        with peak_memory() as peaks:
            value = fn()
        self.steps.append({"stage": name, "cached": False, "seconds": time.perf_counter() - start,
                           "from_run": self.parent_id, "device": None,
                           "peak_rss_mib": peaks.rss_mib, "peak_cuda_mib": peaks.cuda_mib})
        return value


def _best_effort(record: Callable[..., None], *args: Any) -> None:
    """Record a failure in MLflow without hiding it: if recording fails too, say so and let
    the original error through (a later run ends a run left RUNNING, flows/ops/hygiene.py)."""
    try:
        record(*args)
    except Exception as e:
        get_run_logger().warning("could not record the failure in MLflow: %s: %s",
                                 type(e).__name__, e)


@contextmanager
def parent_run(experiment: str, kind: str, params: dict[str, Any]) -> Iterator[PipelineRun]:
    """One MLflow parent run for this Prefect flow run (tagged with its id and UI link, and with
    this process, so a later run can tell if it was killed), after sweeping up what killed runs
    left behind. Ends FINISHED, FAILED (with the error) or KILLED (a signal, Ctrl-C)."""
    # the cores' progress lines, shown in Prefect's task-run logs (PREFECT_LOGGING_EXTRA_LOGGERS)
    logging.getLogger("tasks").setLevel(logging.INFO)
    hygiene.start_watchdog()
    tracker = Tracker(experiment)
    hygiene.sweep(tracker.client)
    parent_id = tracker.start_parent(
        f"{kind}-{flow_run.name or 'local'}", params,
        tags={"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name":
              str(flow_run.name), "prefect.flow_run_url": "" if startup.temporary_server()
              else str(flow_run.ui_url or ""), "pipeline.kind": kind, **hygiene.owner_tags()})
    run = PipelineRun(tracker, parent_id)
    try:
        yield run
    except BaseException as error:
        _best_effort(_log_timings, run)
        _best_effort(tracker.end_with_error, parent_id, error)
        if (ended := as_raised_by_signal(error)) is not error:
            raise ended from error          # a signal that surfaced as another error
        raise
    finally:
        thaw()                               # what the stages set aside (tasks/runtime/resources.py)
    _log_timings(run)
    tracker.finish(parent_id, ok=True)


def _log_timings(run: PipelineRun) -> None:
    run.tracker.client.log_batch(run.parent_id, metrics=[
        Metric(k, float(v), 0, 0) for k, v in run.timings().items()])
