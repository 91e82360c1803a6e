"""Thin Prefect tasks over the plain stage cores in `tasks/`.

The wrappers live here rather than beside each core so that `tasks/` never imports Prefect: the
cores run in pytest, notebooks and on the GPU machine, where Prefect is not installed. Each task
passes upstream `StageResult`s (not bare paths), so its cache key sees their content digests.
Cores are imported inside the task bodies, so the data-only flow never imports torch.
"""

from __future__ import annotations

import time
from pathlib import Path
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from mlflow.entities import Metric
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import startup
from flows.caching import stage_cache_policy
from flows.mlflow_files import DatasetFile
from flows.tracking import Tracker
from tasks.common import StageResult
from tasks.resources import peak_memory
from tasks.config import BaseModelConfig, BenchmarkConfig, MergeConfig, QuantizeConfig, \
    ReportConfig, TrainConfig


def _load_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A model load spec minus the "digest" the flow adds only for the cache key."""
    return {k: v for k, v in spec.items() if k != "digest"}


def _stage(module: str, *, name: str | None = None,
           model_libs: bool = False) -> Callable[[Callable], Task]:
    return task(name=name or module.rsplit(".", 1)[-1], persist_result=True,
                cache_policy=stage_cache_policy(module, model_libs=model_libs))


@_stage("tasks.ingest")
def ingest_task(source: Path, fmt: str = "auto", on_error: str = "fail",
                max_chars: int = 100_000) -> StageResult:
    from tasks import ingest

    return ingest.ingest(source, fmt, on_error, max_chars)


@_stage("tasks.conversations")
def conversations_task(qa: StageResult, system_prompt: str | None, train_ratio: float,
                       shuffle_seed: int | None, split_by: str = "record",
                       duplicates: str = "drop") -> StageResult:
    from tasks import conversations

    return conversations.build_conversations(qa.file("records_arrow"), system_prompt,
                                             train_ratio, shuffle_seed, split_by, duplicates)


@_stage("tasks.validate")
def validate_task(qa: StageResult, data: StageResult) -> StageResult:
    from tasks import validate

    files = {"qa": (qa.file("qa_json"), "qa")} if "qa_json" in qa.files else {}
    return validate.validate({**files, "train": (data.file("train_json"), "conversation"),
                              "dev": (data.file("dev_json"), "conversation")})


@_stage("tasks.data_report")
def data_report_task(qa: StageResult, data: StageResult, tokenizer: Path | None = None
                     ) -> StageResult:
    from tasks import data_report

    return data_report.build_data_report(qa, data, tokenizer)


@task(name="base", cache_policy=NO_CACHE)
def resolve_base_task(cfg: BaseModelConfig) -> StageResult:
    """base.path set: the user's model, used where it is (nothing computed, nothing cached)."""
    from tasks import base_model

    return base_model.resolve_base_model(cfg)


@_stage("tasks.base_model", name="base", model_libs=True)
def base_model_task(data: StageResult, cfg: BaseModelConfig) -> StageResult:
    from tasks import base_model

    return base_model.build_base_model(data.file("train_json"), cfg)


@_stage("tasks.train", model_libs=True)
def train_task(base: StageResult, data: StageResult, cfg: TrainConfig) -> StageResult:
    from tasks import train

    return train.train_adapter(base.path, data.file("train_json"), data.file("dev_json"), cfg)


@_stage("tasks.merge", model_libs=True)
def merge_task(base: StageResult, adapter: StageResult, cfg: MergeConfig) -> StageResult:
    from tasks import merge

    return merge.merge_adapter(base.path, adapter.path, cfg.dtype, cfg.device)


@_stage("tasks.quantize", model_libs=True)
def quantize_task(merged: StageResult, cfg: QuantizeConfig, device: str,
                  fmt: str = "bnb") -> StageResult:
    from tasks import quantize

    return quantize.quantize_int4(merged.path, cfg, device, fmt)


#: the torchao int4 model: the same core and cache policy, its own stage (and MLflow child run)
quantize_torchao_task = quantize_task.with_options(name="quantize_torchao")


@_stage("tasks.benchmark", model_libs=True)
def benchmark_task(variants: dict[str, dict[str, Any]], prompts: list, cfg: BenchmarkConfig,
                   device: str) -> StageResult:
    from tasks import benchmark

    return benchmark.run_benchmark({name: _load_spec(v) for name, v in variants.items()},
                                   prompts, cfg.model_copy(update={"device": device}))


@_stage("tasks.report", model_libs=True)
def report_task(base: dict[str, Any], tuned: dict[str, Any], data: StageResult,
                probes_file: Path, cfg: ReportConfig, extra_sections: dict[str, str]
                ) -> StageResult:
    from tasks import report

    return report.build_report(_load_spec(base), _load_spec(tuned), data.file("dev_json"),
                               probes_file, cfg,
                               extra_sections=extra_sections)


def run_cached(stage_task: Task, **kwargs: Any) -> tuple[StageResult, bool, float]:
    """Run a stage task; return (result, served from cache?, seconds).

    A cache hit whose files were deleted from disk is recomputed rather than trusted."""
    start = time.perf_counter()
    state = stage_task(**kwargs, return_state=True)
    result: StageResult = state.result()
    cached = state.name == "Cached"
    if cached and not result.exists():
        state = stage_task.with_options(refresh_cache=True)(**kwargs, return_state=True)
        result, cached = state.result(), False
    return result, cached, time.perf_counter() - start


@dataclass
class PipelineRun:
    """Runs stages, logs each as an MLflow child run, and keeps the rows of the summary."""

    tracker: Tracker
    parent_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)    # stage -> run holding artifacts
    steps: list[dict[str, Any]] = field(default_factory=list)  # uncached steps (`step`)
    first_stage_at: float | None = None              # time.perf_counter() the first began

    def stage(self, stage_task: Task, *, artifacts: Callable[[StageResult], dict[str, str]]
              = lambda r: r.files,
              datasets: Callable[[StageResult], dict[str, Path | DatasetFile]] = lambda r: {},
              params: dict[str, Any] | None = None,
              **kwargs: Any) -> StageResult:
        name, start = stage_task.name, time.perf_counter()
        self.first_stage_at = self.first_stage_at or start
        try:
            with peak_memory() as peaks:
                result, cached, seconds = run_cached(stage_task, **kwargs)
        except BaseException as error:
            self.tracker.log_failure(name, error)
            raise
        usage = {"stage_peak_rss_mib": peaks.rss_mib}
        if peaks.cuda_mib is not None:
            usage["stage_peak_cuda_mib"] = peaks.cuda_mib
        _, origin = self.tracker.log_stage(result, cached=cached, seconds=seconds,
                                           params=params, artifacts=artifacts(result),
                                           datasets=datasets(result), extra_metrics=usage)
        self.origins[name] = origin
        self.rows.append({"stage": name, "cached": cached, "seconds": seconds,
                          "from_run": origin, "device": result.info.get("device"),
                          "peak_rss_mib": peaks.rss_mib, "peak_cuda_mib": peaks.cuda_mib,
                          "total_seconds": time.perf_counter() - start})
        cuda = "" if peaks.cuda_mib is None else f", peak CUDA {peaks.cuda_mib:,.0f} MiB"
        print(f"[stage] {name}: {'cache hit' if cached else 'computed'} in {seconds:.1f} s"
              f"{' on ' + result.info['device'] if result.info.get('device') else ''}, peak "
              f"RSS {peaks.rss_mib:,.0f} MiB{cuda}", flush=True)
        return result

    def timings(self) -> dict[str, float]:
        """Where the run's time went, as metrics of the parent run: each stage including its
        MLflow logging (`stage_total_seconds.<stage>`) and, for a command-line run, the time
        from the process's start to its first stage (`startup_seconds`), of which the
        temporary Prefect server took `server_start_seconds` to boot and kept the run waiting
        `server_wait_seconds` (see flows/startup.py)."""
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


@contextmanager
def parent_run(experiment: str, kind: str, params: dict[str, Any]) -> Iterator[PipelineRun]:
    """One MLflow parent run for this Prefect flow run (tagged with its id and UI link),
    marked FAILED if any stage fails."""
    tracker = Tracker(experiment)
    parent_id = tracker.start_parent(
        f"{kind}-{flow_run.name or 'local'}", params,
        tags={"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name":
              str(flow_run.name), "prefect.flow_run_url": "" if startup.temporary_server()
              else str(flow_run.ui_url or ""), "pipeline.kind": kind})
    run = PipelineRun(tracker, parent_id)
    try:
        yield run
    except BaseException:
        _log_timings(run)
        tracker.finish(parent_id, ok=False)
        raise
    _log_timings(run)
    tracker.finish(parent_id, ok=True)


def _log_timings(run: PipelineRun) -> None:
    run.tracker.client.log_batch(run.parent_id, metrics=[
        Metric(k, float(v), 0, 0) for k, v in run.timings().items()])
