"""Thin Prefect tasks over the plain stage cores in `tasks/`.

The wrappers live here rather than beside each core so that `tasks/` never imports Prefect: the
cores run in pytest, notebooks and on the GPU machine, where Prefect is not installed. Each task
passes upstream `StageResult`s (not bare paths), so its cache key sees their content digests.
Cores are imported inside the task bodies, so the data-only flow never imports torch. On a GPU
machine every model stage's core runs in a process of its own (`model_core`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.caching import cached_stage, log_folder
from tasks.config import BaseModelConfig, BenchmarkConfig, MergeConfig, PreferenceConfig, \
    QuantizeConfig, ReportConfig, TrainConfig
from tasks.model.model_spec import ModelSpec
from tasks.runtime.results import StageName, StageResult


def model_core(core: Callable[..., StageResult], /, *args: Any, **kwargs: Any) -> StageResult:
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
        qa.out.records_arrow, system_prompt, train_ratio, shuffle_seed, split_by, duplicates,
        source=source, skipped=qa.out.skipped_records)


@cached_stage(StageName.VALIDATE, "tasks.data.validate")
def validate_task(qa: StageResult, data: StageResult) -> StageResult:
    from tasks.data import validate

    return validate.validate_data(qa.out, data.out)


@cached_stage(StageName.DATA_REPORT, "tasks.data.data_report")
def data_report_task(qa: StageResult, data: StageResult, tokenizer: Path | None = None
                     ) -> StageResult:
    """`tokenizer`: a model folder whose tokens the lengths are counted in (loaded here, so the
    data stages never depend on the model's code)."""
    from tasks.data import data_report
    from tasks.model.tokenizer import data_tokenizer

    tok = data_tokenizer(tokenizer) if tokenizer else None
    return data_report.build_data_report(qa.out, data.out, tok,
                                         str(tokenizer) if tokenizer else None)


@task(name=StageName.BASE.value, cache_policy=NO_CACHE)
def resolve_base_task(cfg: BaseModelConfig) -> StageResult:
    """base.path set: the user's model, used where it is (nothing computed, nothing cached)."""
    from tasks.model import base_model

    return base_model.resolve_base_model(cfg)


@cached_stage(StageName.BASE, "tasks.model.chatglm", model_libs=True)
def convert_base_task(source: Path) -> StageResult:
    """base.path is a ChatGLM2/3 or original GLM-4 folder: converted once to a native one."""
    from tasks.model import chatglm

    return model_core(chatglm.convert_folder, source)


@cached_stage(StageName.BASE, "tasks.model.base_model", model_libs=True, logged_as="base_model")
def base_model_task(data: StageResult, cfg: BaseModelConfig) -> StageResult:
    from tasks.model import base_model

    return base_model.build_base_model(data.out.train_json, cfg)


@cached_stage(StageName.TRAIN, "tasks.train.train", model_libs=True, logged_as="adapter")
def train_task(base: StageResult, data: StageResult, cfg: TrainConfig) -> StageResult:
    from tasks.train import train

    return model_core(train.train_adapter, base.path, data.out.train_json, data.out.dev_json,
                       cfg)


@cached_stage(StageName.MERGE, "tasks.export.merge", model_libs=True, logged_as="merged_model")
def merge_task(base: StageResult, adapter: StageResult, cfg: MergeConfig) -> StageResult:
    from tasks.export import merge

    return model_core(merge.merge_adapter, base.path, adapter.path, cfg.dtype, cfg.device)


@cached_stage(StageName.QUANTIZE, "tasks.export.quantize", model_libs=True, logged_as="int4_model")
def quantize_task(merged: StageResult, cfg: QuantizeConfig, device: str,
                  fmt: str = "bnb") -> StageResult:
    from tasks.export import quantize

    return model_core(quantize.quantize_int4, merged.path, cfg, device, fmt)


#: the torchao int4 model: the same core and cache policy, its own stage (and MLflow child run)
quantize_torchao_task = log_folder(
    quantize_task.with_options(name=StageName.QUANTIZE_TORCHAO.value), "int4_torchao_model")


@cached_stage(StageName.BENCHMARK, "tasks.evaluate.benchmark", model_libs=True)
def benchmark_task(variants: dict[str, ModelSpec], prompts: list, cfg: BenchmarkConfig,
                   device: str) -> StageResult:
    from tasks.evaluate import benchmark

    return benchmark.run_benchmark(variants, prompts, cfg.model_copy(update={"device": device}))


@cached_stage(StageName.GENERATIONS, "tasks.evaluate.generations", model_libs=True)
def generations_task(base: ModelSpec, tuned: ModelSpec, data: StageResult, probes_file: Path,
                     cfg: ReportConfig, supervised: ModelSpec | None = None) -> StageResult:
    from tasks.evaluate import generations

    return model_core(generations.generate_answers, base, tuned, data.out.dev_json,
                       probes_file, cfg, supervised)


@cached_stage(StageName.PREFERENCE_DATA, "tasks.data.preferences")
def preference_data_task(source: Path, fmt: str, on_error: str, train_ratio: float,
                         shuffle_seed: int | None) -> StageResult:
    from tasks.data import preferences

    return preferences.build_preferences(source, fmt, on_error, train_ratio, shuffle_seed)


#: TRL tokenizes the pairs with `datasets.map`, whose fingerprint asks dill for a function's
#: globals, and dill reads them from `dis.dis` printed into a captured sys.stdout (dill
#: detect.nestedglobals); under a flow's `log_prints` Prefect's print patch sends each line of
#: that bytecode listing to the run log instead (prefect/logging/loggers.py print_as_log).
@cached_stage(StageName.PREFERENCE, "tasks.train.preference", model_libs=True,
              extra_libs=("trl",), log_prints=False, logged_as="preference_adapter")
def preference_task(supervised: StageResult, pairs: StageResult, cfg: PreferenceConfig
                    ) -> StageResult:
    from tasks.train import preference

    return model_core(preference.tune_preferences, supervised.path, pairs.out.train_pairs_json,
                       pairs.out.dev_pairs_json, cfg)


@cached_stage(StageName.MERGE_PREFERENCE, "tasks.export.merge", model_libs=True,
              logged_as="merged_model")
def merge_preference_task(supervised: StageResult, adapter: StageResult, cfg: MergeConfig
                          ) -> StageResult:
    from tasks.export import merge

    return model_core(merge.merge_adapter, supervised.path, adapter.path, cfg.dtype,
                       cfg.device, StageName.MERGE_PREFERENCE)


@cached_stage(StageName.PREFERENCE_EVAL, "tasks.evaluate.preference_eval", model_libs=True)
def preference_eval_task(models: dict[str, ModelSpec], pairs: StageResult) -> StageResult:
    from tasks.evaluate import preference_eval

    return model_core(preference_eval.evaluate_preferences, models, pairs.out.dev_pairs_json)


@cached_stage(StageName.REPORT, "tasks.evaluate.report")
def report_task(generations: StageResult, extra_sections: dict[str, str]) -> StageResult:
    from tasks.evaluate import report

    return report.render_report(generations.out.generations_json, extra_sections)
