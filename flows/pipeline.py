"""The full pipeline flow: `build` (data -> base -> train -> merge [-> preference -> merge it]
-> quantize -> benchmark -> generations [-> preference eval] -> report), then `register`;
every stage a cached Prefect task and an MLflow child run of one parent run. flows/nightly.py
composes the same two steps with its champion gate between them.

    python -m flows.pipeline                                # embedded default, offline, CPU
    python -m flows.pipeline --set train.method=qlora --set base.path=/models/Qwen2.5-0.5B-Instruct
    python -m flows.pipeline --config my_run.yaml
"""

from __future__ import annotations

if __name__ == "__main__":        # the command line: set up before Prefect is imported
    from flows.ops.startup import prepare_cli

    prepare_cli()

import importlib.util
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.ops import cli, commands
from flows.data import data_stages
from flows.headline import generations_table, headline_metrics, log_headline
from flows.running import PipelineRun, parent_run
from flows.stages import Entry, logged_folder
from tasks.runtime.errors import ConfigError
from tasks.runtime.results import StageResult, StepName, declared
from tasks.runtime.paths import is_local_model_path
from tasks.runtime.files import read_json
from tasks.config import BaseModelConfig, PipelineConfig, PreferenceConfig
from tasks.config.run_form import to_config
from tasks.config.methods import METHODS
from tasks.config.model_folder import classify
from tasks.model.model_spec import ModelSpec
from flows.registry import RegisteredVersion, crown_first, log_chat_model, register_version
from tasks.evaluate.scoring import read_dev_prompts


@flow(name="finetune-pipeline", log_prints=True)
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Raw Q/A text -> fine-tuned, merged, int4-quantized, benchmarked, reported and registered
    chat model. Every stage is cached by content; every artifact and metric goes to MLflow."""
    with parent_run(config.experiment, "pipeline", config.model_dump(mode="json")) as run:
        built = build(run, config)
        versions = register(run, config, built)
        crowned = crown_first(run.tracker.client, versions)
        return finish(run, built, versions, crowned)


@flow(name="finetune-pipeline", log_prints=True)
def run_form(data_file: str = "", base_model: str = "", method: Literal[tuple(METHODS)] = "lora",
             epochs: float = 6.0, learning_rate: float = 0.0,
             model_name: str = "plant-care-chat", experiment: str = "finetune-pipeline",
             options: dict[str, Any] = {}) -> dict[str, Any]:      # noqa: B006 (never mutated)
    """Fine-tune a chat model on your data: the Run form of the deployment `full-pipeline`.
    The first fields are what people change; `options` holds everything else, in sections
    (tasks/config/run_form.py). An empty field (or a learning rate of 0) takes the default.

    Args:
        data_file: Your data: a .txt of question/answer blocks, or a JSON / JSON Lines file
            (alpaca, sharegpt, conversations, ...). Empty: the bundled sample.
        base_model: Folder of the model to fine-tune (a Hugging Face folder; ChatGLM2/3 and
            GLM-4 folders are converted). Empty: a tiny model built offline.
        method: lora: the full-precision model + LoRA. qlora: the model in 4 bits + LoRA (least
            memory). ptuning: a P-Tuning v2 prefix.
        epochs: Passes over your training data.
        learning_rate: Peak learning rate. 0: the method's own default.
        model_name: Name of the model in the MLflow Model Registry.
        experiment: MLflow experiment the run is recorded in.
        options: Everything else, by section: data_options, training_details,
            preference (DPO / ORPO after fine-tuning), merge_and_quantize, benchmark, report,
            embedded_default_model; each holds the
            fields of that part of the config (schemas/run_options.schema.json), e.g.
            {"training_details": {"batch_size": 8}}. {} keeps every default.
    """
    essentials = {k: v for k, v in locals().items() if k != "options"}
    return pipeline.fn(to_config(essentials, options))


@dataclass(frozen=True)
class Preference:
    """The preference-tuning results of a run (`preference.method`)."""

    pairs: StageResult                      # preference_data: train/dev pairs
    adapter: StageResult                    # the preference adapter
    supervised: StageResult                 # the merged supervised model it was tuned on
    scores: StageResult                     # preference_eval: base, supervised, tuned


@dataclass(frozen=True)
class Built:
    """Every stage result of `build` (README "What each stage produces"). A P-Tuning v2 prefix
    is not mergeable: then `merged` and `int4` are None and the adapter is what is served.
    With preference tuning, `merged` is the preference-tuned model and `supervised` the
    merged model it was tuned from."""

    data: StageResult                       # conversations: train/dev JSON
    base: StageResult
    adapter: StageResult
    merged: StageResult | None
    int4: StageResult | None                # bitsandbytes nf4
    fast_int4: StageResult | None           # torchao int4 (on a GPU)
    benchmark: StageResult
    generations: StageResult                # base and tuned answers, scored
    report: StageResult                     # rendered: generations + the benchmark table
    dtype: str                              # the dtype the models were compared in
    preference: Preference | None = None


def build(run: PipelineRun, cfg: PipelineConfig) -> Built:
    """Every stage up to the report, inside an open parent run; the parent run gets the
    headline metrics and the generations table. Nothing is registered."""
    # torch loads here, not at import: a mistake on the command line is reported in seconds
    from tasks.evaluate import benchmark, generations, preference_eval, report
    from tasks.export import merge, quantize
    from tasks.model.modeling import pick_device, resolve_dtype
    from tasks.runtime import child_process
    from tasks.train import base_model, preference, train
    refuse_foreign_code(cfg.base)
    child_process.prepare()     # on a GPU: the first stage process imports during the data stages
    data_cfg = cfg.data
    if cfg.base.path and data_cfg.tokenizer is None and Path(cfg.base.path).is_dir():
        data_cfg = data_cfg.model_copy(update={"tokenizer": Path(cfg.base.path)})
    _, data = data_stages(run, data_cfg)     # token lengths in the report: the model's tokens
    pairs = preference_pairs(run, cfg.preference)  # a bad pairs file fails before training
    if cfg.base.path:
        base = user_base(run, cfg.base)
    else:
        base = run.stage(base_model.stage, data=data, cfg=cfg.base)
    adapter = run.stage(train.stage, base=base, data=data, cfg=cfg.train)
    device = pick_device(cfg.benchmark.device)
    merged = int4 = fast_int4 = supervised = tuned_adapter = None
    method = METHODS[cfg.train.method]
    if not method.mergeable:                # a prefix is not a weight delta: nothing to merge
        print("train.method=ptuning: the P-Tuning v2 prefix cannot be merged into the weights; "
              "merge and int4 are skipped, base + prefix adapter is benchmarked, reported and "
              "registered (the adapter folder; load it with peft on the base).")
    else:
        merged = run.stage(merge.stage, base=base, adapter=adapter, cfg=cfg.merge)
        if pairs is not None:               # a preference adapter on the merged model, merged
            supervised = merged
            tuned_adapter = run.stage(preference.stage, supervised=supervised, pairs=pairs,
                                      cfg=cfg.preference.for_base(embedded=not cfg.base.path))
            merged = run.stage(merge.preference_stage, supervised=supervised,
                               adapter=tuned_adapter, cfg=cfg.merge)
        int4 = run.stage(quantize.stage, merged=merged, cfg=cfg.quantize, device=device)
        if torchao_int4(cfg, device):
            fast_int4 = run.stage(quantize.torchao_stage, merged=merged, cfg=cfg.quantize,
                                  device=device)

    dtype = resolve_dtype(cfg.merge.dtype, device)
    base_spec = ModelSpec(base.path, dtype, digest=base.digest)
    adapted = ModelSpec(base.path, dtype, adapter=adapter.path, digest=adapter.digest,
                        quantization=method.serving_quantization(cfg.train))  # as trained
    variants = {"base": base_spec, "base+adapter": adapted}
    for name, result in (("merged", merged), ("int4", int4), ("int4-torchao", fast_int4)):
        if result is not None:
            variants[name] = ModelSpec(result.path, result.dtype, digest=result.digest)
    bench = run.stage(benchmark.stage, variants=variants,
                      prompts=[p for p, _ in read_dev_prompts(data.out.dev_json)
                               [:cfg.benchmark.prompts]],
                      cfg=cfg.benchmark, device=device)
    supervised_spec = supervised and ModelSpec(supervised.path, dtype, digest=supervised.digest)
    answers = run.stage(generations.stage, base=base_spec,
                        tuned=variants.get("merged", adapted), data=data,
                        probes_file=Path(cfg.report.probes_file), cfg=cfg.report,
                        supervised=supervised_spec)
    sections, tuned_preference = {"Benchmark": bench.summary}, None
    if supervised is not None:              # each model's preference accuracy on dev pairs
        scores = run.stage(preference_eval.stage, models={
            "base": base_spec, "supervised": supervised_spec, "tuned": variants["merged"]},
            pairs=pairs)
        tuned_preference = Preference(pairs, tuned_adapter, supervised, scores)
        sections["Preference"] = scores.summary
    rendered = run.stage(report.stage, generations=answers, extra_sections=sections)
    create_markdown_artifact(key="finetune-report", markdown=rendered.summary,
                             description=f"Before/after report, MLflow run {run.parent_id}")
    log_headline(run.tracker.client, run.parent_id,
                 headline_metrics(data, adapter, answers, bench, int4,
                                  tuned_preference.scores if tuned_preference else None),
                 generations_table(answers))
    return Built(data, base, adapter, merged, int4, fast_int4, bench, answers, rendered,
                 dtype, tuned_preference)


def preference_pairs(run: PipelineRun, cfg: PreferenceConfig) -> StageResult | None:
    """The preference pairs, read, checked and split with the data (`preference.method`)."""
    if cfg.method == "none":
        return None
    from tasks.data import preferences

    return run.stage(preferences.build_preferences, source=Path(cfg.source), fmt=cfg.format,
                     on_error=cfg.on_error, train_ratio=cfg.train_ratio,
                     shuffle_seed=cfg.shuffle_seed)


def refuse_foreign_code(cfg: BaseModelConfig) -> None:
    """Before any stage: a base.path folder that needs its own Python code is refused in one
    line (tasks/config/model_folder.py; the command line checks this when it loads the config)."""
    if cfg.path and is_local_model_path(cfg.path) and Path(cfg.path).is_dir():
        if (kind := classify(cfg.path)).kind == "refused":
            raise ConfigError(f"base.path={cfg.path}", kind.reason or "needs code of its own")


def user_base(run: PipelineRun, cfg: BaseModelConfig) -> StageResult:
    """The user's base model: a ChatGLM2/3 or original GLM-4 folder converted once (cached by
    content), any other used where it is."""
    from tasks.model import chatglm
    from tasks.train import base_model

    if is_local_model_path(cfg.path) and Path(cfg.path).is_dir() and \
            classify(cfg.path).kind == "convert":
        return run.stage(chatglm.convert_folder, folder=Path(cfg.path),
                         params={"path": cfg.path})
    return run.stage(base_model.resolve_base_model, cfg=cfg, params={"path": cfg.path},
                     artifacts=lambda _: {})     # the user's folder: nothing to copy


def register(run: PipelineRun, cfg: PipelineConfig, built: Built) -> list[RegisteredVersion]:
    """The registry versions of what `build` made (idempotent by digest), as the step
    "register"; each version's number goes on the parent run as a tag."""
    versions = run.step(StepName.REGISTER, lambda: _register(run, cfg, built))
    for v in versions:
        run.tracker.client.set_tag(run.parent_id, f"registered.{v.name}", v.version)
    return versions


def finish(run: PipelineRun, built: Built, versions: list[RegisteredVersion],
           crowned: list[RegisteredVersion] = ()) -> dict[str, Any]:
    """Print the run's summary; the flow's return value."""
    text = _summary(run, built.report, built.benchmark, versions, crowned)
    print(text)
    return {"mlflow_run_id": run.parent_id, "stages": run.rows, "steps": run.steps,
            "generations": built.generations.files, "report": built.report.files,
            "benchmark": read_json(built.benchmark.out.benchmark_json),
            "benchmark_failed": read_json(built.benchmark.out.failed_json),
            "registered": [v.__dict__ for v in versions],
            "crowned": [v.__dict__ for v in crowned], "summary": text}


def torchao_int4(cfg: PipelineConfig, device: str) -> bool:
    """Whether this run makes the torchao int4 model (`quantize.torchao`; auto: on a GPU)."""
    if cfg.quantize.torchao == "on" and not device.startswith("cuda"):
        raise ValueError("quantize.torchao=on needs a CUDA GPU (the tinygemm int4 layout is made "
                         f"and served there); this run's device is {device!r}")
    if cfg.quantize.torchao != "auto":
        return cfg.quantize.torchao == "on"
    if device.startswith("cuda") and importlib.util.find_spec("torchao") is None:
        print("quantize.torchao=auto: torchao is not installed (`make setup GPU=1` installs it), "
              "so no torchao int4 model is made")
        return False
    return device.startswith("cuda")


def _register(run: PipelineRun, cfg: PipelineConfig, built: Built) -> list[RegisteredVersion]:
    from tasks.export import merge, quantize
    from tasks.train import train

    mlflow_models = (merge.stage, merge.preference_stage, quantize.stage)  # flows/registry.py
    data, adapter, merged, scored = built.data, built.adapter, built.merged, built.generations
    client = run.tracker.client
    preference = built.preference
    metrics = {"eval_loss_before": adapter.out.eval_loss_before,
               "eval_loss_after": adapter.out.eval_loss_after, **scored.out.scores,
               **(preference.scores.out.scores if preference else {})}
    tags = {"data_digest": data.digest, "method": cfg.train.method,
            **{k: f"{v:.4f}" for k, v in metrics.items()}}
    if preference is not None:
        tags |= {"preference_method": cfg.preference.method,
                 "preference_data_digest": preference.pairs.digest}
    versions = []
    entries: list[tuple[str, StageResult, Entry]] = [
        (cfg.registry.model_name, merged, merge.preference_stage if preference else merge.stage),
        (f"{cfg.registry.model_name}-int4", built.int4, quantize.stage)]
    if built.fast_int4 is not None:
        entries.append((f"{cfg.registry.model_name}-int4-torchao", built.fast_int4,
                        quantize.torchao_stage))
    if merged is None:                      # ptuning: the prefix adapter (needs the base)
        entries = [(f"{cfg.registry.model_name}-prefix", adapter, train.stage)]
    for name, result, entry in entries:
        origin, folder = run.origins[declared(entry).name], logged_folder(entry)
        source = f"{client.get_run(origin).info.artifact_uri}/{folder}"
        if entry in mlflow_models:          # an MLflow model, logged in the stage's run
            source = partial(log_chat_model, result.path, origin,
                             quantized=entry is quantize.stage)
        versions.append(register_version(
            client, name, source=source, run_id=origin, digest=result.digest,
            tags={**tags, "variant": folder},
            description="Fine-tuned chat model produced by flows/pipeline.py"))
    return versions


def _summary(run: PipelineRun, report: StageResult, bench: StageResult,
             versions: list[RegisteredVersion], crowned: list[RegisteredVersion]) -> str:
    hits = sum(r["cached"] for r in run.rows)
    lines = [f"Pipeline finished: {hits}/{len(run.rows)} stages were cache hits.", "",
             "| stage | status | seconds | device | peak RSS MiB | peak CUDA MiB |",
             "|---|---|---:|---|---:|---:|"]
    for r in run.rows + run.steps:
        status = f"cache hit (computed in MLflow run {r['from_run'][:8]})" if r["cached"] \
            else f"recomputed: cache invalidated ({r['invalidated']})" if r.get("invalidated") \
            else "computed" if r in run.rows else "done (not cached)"
        cuda = "–" if r["peak_cuda_mib"] is None else f"{r['peak_cuda_mib']:,.0f}"
        lines.append(f"| {r['stage']} | {status} | {r['seconds']:.1f} | {r['device'] or '–'} | "
                     f"{r['peak_rss_mib']:,.0f} | {cuda} |")
    lines += ["", f"Report:      {report.out.report_html}",
              f"MLflow run:  {run.parent_id}  (tracking: {run.tracker.uri})",
              f"             {run.tracker.url(run.parent_id)}  (in the MLflow UI)"]
    lines += [f"Registered:  {v.name} version {v.version}"
              + ("" if v.created else " (same model as before: existing version kept)")
              + (" -- its first version: @champion, served by `make serve`"
                 if v in crowned else "") for v in versions]
    lines += ["", "Benchmark:", bench.summary]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, load = commands.COMMANDS["flows.pipeline"].parse(argv, __doc__)
    return cli.run(load, pipeline, args)


if __name__ == "__main__":
    sys.exit(main())
