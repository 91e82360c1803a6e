"""Thin Prefect tasks over the plain stage cores in `tasks/`.

The wrappers live here rather than beside each core so that `tasks/` never imports Prefect: the
cores run in pytest, notebooks and on the GPU machine, where Prefect is not installed. Each task
passes upstream `StageResult`s (not bare paths), so its cache key sees their content digests.
Cores are imported inside the task bodies, so the data-only flow never imports torch. On a GPU
machine every model stage's core runs in a process of its own (`_model_core`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout
from mlflow.entities import Metric
from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.ops import hygiene, startup
from flows.caching import cached_stage, inputs_lock
from flows.mlflow_files import DatasetFile
from flows.ops.signals import as_raised_by_signal
from flows.tracking import Tracker
from tasks.runtime.errors import DataError
from tasks.runtime.results import StageName, StageResult
from tasks.config import BaseModelConfig, BenchmarkConfig, MergeConfig, QuantizeConfig, \
    ReportConfig, TrainConfig
from tasks.model.model_spec import ModelSpec
from tasks.runtime.resources import peak_memory, thaw


def _model_core(core: Callable[..., StageResult], /, *args: Any, **kwargs: Any) -> StageResult:
    """`core(*args, **kwargs)`; where there is a GPU, in a fresh process
    (tasks/runtime/child_process.py), so that the flow process never holds a model and each stage's
    host memory peak is its own
    (docs/gpu.md "At 6 B on one GPU"). On a CPU (the tiny default) here: no start-up cost."""
    from tasks.runtime import child_process
    from tasks.model.modeling import pick_device

    if pick_device("auto").startswith("cuda"):
        return child_process.call(core, *args, **kwargs)
    return core(*args, **kwargs)


@cached_stage(StageName.INGEST, "tasks.data.ingest")
def ingest_task(source: Path, fmt: str = "auto", on_error: str = "fail",
                max_chars: int = 100_000) -> StageResult:
    from tasks.data import ingest

    return ingest.ingest(source, fmt, on_error, max_chars)


@cached_stage(StageName.CONVERSATIONS, "tasks.data.conversations", ignore=("source",))
def conversations_task(qa: StageResult, system_prompt: str | None, train_ratio: float,
                       shuffle_seed: int | None, split_by: str = "record",
                       duplicates: str = "drop", source: str | None = None) -> StageResult:
    """`source`: the user's input, named in errors (not part of the cache key)."""
    from tasks.data import conversations

    return conversations.build_conversations(
        qa.file("records_arrow"), system_prompt, train_ratio, shuffle_seed, split_by,
        duplicates, source=source, skipped=int(qa.metrics.get("skipped_records", 0)))


@cached_stage(StageName.VALIDATE, "tasks.data.validate")
def validate_task(qa: StageResult, data: StageResult) -> StageResult:
    from tasks.data import validate

    files = {"qa": (qa.file("qa_json"), "qa")} if "qa_json" in qa.files else {}
    return validate.validate({**files, "train": (data.file("train_json"), "conversation"),
                              "dev": (data.file("dev_json"), "conversation")})


@cached_stage(StageName.DATA_REPORT, "tasks.data.data_report")
def data_report_task(qa: StageResult, data: StageResult, tokenizer: Path | None = None
                     ) -> StageResult:
    """`tokenizer`: a model folder whose tokens the lengths are counted in (loaded here, so the
    data stages never depend on the model's code)."""
    from tasks.data import data_report
    from tasks.model.tokenizer import data_tokenizer

    tok = data_tokenizer(tokenizer) if tokenizer else None
    return data_report.build_data_report(qa, data, tok, str(tokenizer) if tokenizer else None)


@task(name=StageName.BASE.value, cache_policy=NO_CACHE)
def resolve_base_task(cfg: BaseModelConfig) -> StageResult:
    """base.path set: the user's model, used where it is (nothing computed, nothing cached)."""
    from tasks.model import base_model

    return base_model.resolve_base_model(cfg)


@cached_stage(StageName.BASE, "tasks.model.chatglm", model_libs=True)
def convert_base_task(source: Path) -> StageResult:
    """base.path is a ChatGLM2/3 or original GLM-4 folder: converted once to a native one."""
    from tasks.model import chatglm

    return _model_core(chatglm.convert_folder, source)


@cached_stage(StageName.BASE, "tasks.model.base_model", model_libs=True)
def base_model_task(data: StageResult, cfg: BaseModelConfig) -> StageResult:
    from tasks.model import base_model

    return base_model.build_base_model(data.file("train_json"), cfg)


@cached_stage(StageName.TRAIN, "tasks.train.train", model_libs=True)
def train_task(base: StageResult, data: StageResult, cfg: TrainConfig) -> StageResult:
    from tasks.train import train

    return _model_core(train.train_adapter, base.path, data.file("train_json"),
                       data.file("dev_json"), cfg)


@cached_stage(StageName.MERGE, "tasks.export.merge", model_libs=True)
def merge_task(base: StageResult, adapter: StageResult, cfg: MergeConfig) -> StageResult:
    from tasks.export import merge

    return _model_core(merge.merge_adapter, base.path, adapter.path, cfg.dtype, cfg.device)


@cached_stage(StageName.QUANTIZE, "tasks.export.quantize", model_libs=True)
def quantize_task(merged: StageResult, cfg: QuantizeConfig, device: str,
                  fmt: str = "bnb") -> StageResult:
    from tasks.export import quantize

    return _model_core(quantize.quantize_int4, merged.path, cfg, device, fmt)


#: the torchao int4 model: the same core and cache policy, its own stage (and MLflow child run)
quantize_torchao_task = quantize_task.with_options(name=StageName.QUANTIZE_TORCHAO.value)


@cached_stage(StageName.BENCHMARK, "tasks.evaluate.benchmark", model_libs=True)
def benchmark_task(variants: dict[str, ModelSpec], prompts: list, cfg: BenchmarkConfig,
                   device: str) -> StageResult:
    from tasks.evaluate import benchmark

    return benchmark.run_benchmark(variants, prompts, cfg.model_copy(update={"device": device}))


@cached_stage(StageName.GENERATIONS, "tasks.evaluate.generations", model_libs=True)
def generations_task(base: ModelSpec, tuned: ModelSpec, data: StageResult, probes_file: Path,
                     cfg: ReportConfig) -> StageResult:
    from tasks.evaluate import generations

    return _model_core(generations.generate_answers, base, tuned, data.file("dev_json"),
                       probes_file, cfg)


@cached_stage(StageName.REPORT, "tasks.evaluate.report")
def report_task(generations: StageResult, extra_sections: dict[str, str]) -> StageResult:
    from tasks.evaluate import report

    return report.render_report(generations.file("generations_json"), extra_sections)


@dataclass(frozen=True)
class Stage:
    """A row of the stage table: the task, the stages whose results it is given, and what its
    MLflow child run holds: its output folder whole under `folder`, else its result's files
    (`log_outputs=False`: nothing, e.g. a user's model used where it is)."""

    task: Task
    inputs: tuple[StageName, ...] = ()
    folder: str | None = None
    log_outputs: bool = True

    @property
    def name(self) -> str:
        """The stage's name: its Prefect task, MLflow child run and `outputs/<name>/`."""
        return self.task.name

    def artifacts(self, result: StageResult) -> dict[str, str]:
        if not self.log_outputs:
            return {}
        return {self.folder: result.path} if self.folder else dict(result.files)


#: Every stage, in the order a run computes them (README "What each stage produces"). A run
#: computes some of them: base is built (the embedded default) or resolved (`base.path`); a
#: prefix (ptuning) is neither merged nor quantized; the torchao int4 model is made on a GPU.
STAGES: tuple[Stage, ...] = (
    Stage(ingest_task),
    Stage(conversations_task, (StageName.INGEST,)),
    Stage(validate_task, (StageName.INGEST, StageName.CONVERSATIONS)),
    Stage(data_report_task, (StageName.INGEST, StageName.CONVERSATIONS)),
    Stage(base_model_task, (StageName.CONVERSATIONS,), folder="base_model"),
    Stage(resolve_base_task, log_outputs=False),
    Stage(convert_base_task),                       # conversion.json (the weights stay out)
    Stage(train_task, (StageName.BASE, StageName.CONVERSATIONS), folder="adapter"),
    Stage(merge_task, (StageName.BASE, StageName.TRAIN), folder="merged_model"),
    Stage(quantize_task, (StageName.MERGE,), folder="int4_model"),
    Stage(quantize_torchao_task, (StageName.MERGE,), folder="int4_torchao_model"),
    Stage(benchmark_task, (StageName.CONVERSATIONS, StageName.BASE, StageName.TRAIN,
                           StageName.MERGE, StageName.QUANTIZE, StageName.QUANTIZE_TORCHAO)),
    Stage(generations_task, (StageName.CONVERSATIONS, StageName.BASE, StageName.TRAIN,
                             StageName.MERGE)),
    Stage(report_task, (StageName.GENERATIONS, StageName.BENCHMARK)),
)


def stage_of(stage_task: Task) -> Stage:
    """The table's row of `stage_task` (a task outside the table, e.g. the nightly's
    evaluate, logs its result's files)."""
    return next((s for s in STAGES if s.task is stage_task), Stage(stage_task))


def check_inputs(stage_task: Task, kwargs: dict[str, Any]) -> None:
    """A stage of the table is given results of the stages its row lists as inputs, and of no
    other: what the table says about the flow's shape stays true. (Models reach the benchmark
    and generations as `ModelSpec`s, which this does not see.)"""
    row = next((s for s in STAGES if s.task is stage_task), None)
    given = {v.stage for v in kwargs.values() if isinstance(v, StageResult)}
    if row is not None and not given <= set(row.inputs):
        raise ValueError(f"stage {row.name} was given the result of "
                         f"{', '.join(sorted(given - set(row.inputs)))}, which its row of the "
                         f"stage table (flows/stages.py STAGES) does not list as an input")


@dataclass(frozen=True)
class StageRun:
    """How a stage went: its result, whether it was served from the cache, how long it took,
    and why a cached result was not trusted (its outputs changed on disk, or an upstream stage
    was recomputed for that reason)."""

    result: StageResult
    cached: bool
    seconds: float
    invalidated: str | None = None


def run_cached(stage_task: Task, *, distrust: str | None = None, **kwargs: Any) -> StageRun:
    """Run a stage task under its inputs lock. A cache hit is verified against the manifests of
    its outputs; a hit that fails (or any hit, when `distrust` gives a reason) is recomputed."""
    start = time.perf_counter()
    with _waiting_for(inputs_lock(stage_task.name, kwargs), stage_task.name):
        runner = stage_task.with_options(refresh_cache=True) if distrust else stage_task
        state = runner(**kwargs, return_state=True)
        result: StageResult = state.result()
        cached = state.name == "Cached"
        problem = result.problem() if cached else None
        if problem:
            get_run_logger().warning("stage %s: the cached result is not trusted, recomputing: "
                                     "%s", stage_task.name, problem)
            state = stage_task.with_options(refresh_cache=True)(**kwargs, return_state=True)
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

    def stage(self, stage_task: Task, *,
              artifacts: Callable[[StageResult], dict[str, str]] | None = None,
              datasets: Callable[[StageResult], dict[str, Path | DatasetFile]] = lambda r: {},
              params: dict[str, Any] | None = None,
              **kwargs: Any) -> StageResult:
        """Run `stage_task` on `kwargs` (cached), log it as an MLflow child run with its
        artifacts (the stage table's, unless `artifacts` says), datasets and params."""
        check_inputs(stage_task, kwargs)
        name, start = stage_task.name, time.perf_counter()
        artifacts = artifacts or stage_of(stage_task).artifacts
        self.first_stage_at = self.first_stage_at or start
        upstream = next((stage for mark, stage in self.recomputed.items()
                         if _mentions(kwargs, mark)), None)
        distrust = upstream and f"upstream stage {upstream} was recomputed (its cache was " \
                                "invalidated)"
        try:
            with peak_memory() as peaks:
                run = run_cached(stage_task, distrust=distrust, **kwargs)
        except BaseException as error:
            if isinstance(error, DataError) and error.stage is None:
                error.stage = name
            _best_effort(self.tracker.log_failure, name, error)
            raise
        result = run.result
        if run.invalidated:
            self.recomputed |= {result.result_id: name, result.path: name}
        usage = {"stage_peak_rss_mib": peaks.rss_mib}
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
                          "total_seconds": time.perf_counter() - start})
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
