"""What a run's MLflow parent run shows at a glance (README "Where to look"): its headline
metrics, comparable across runs as columns of the runs table, and the before/after generations
as an MLflow table (`mlflow.log_table`), which the UI shows and compares across runs.

Plain functions of the stage results; `log_headline` is the one MLflow call site.
"""

from __future__ import annotations

from typing import Any

from tasks.evaluate.benchmark_rows import read_rows
from tasks.runtime.results import StageResult
from tasks.runtime.files import read_json
from tasks.evaluate.scoring import COLUMNS, SCORES

#: the artifact the generations table is logged as (the MLflow UI's "Evaluation" tab and the
#: artifact view read it)
GENERATIONS_TABLE = "generations_table.json"


def headline_metrics(data: StageResult, adapter: StageResult, generations: StageResult,
                     bench: StageResult, int4: StageResult | None,
                     preference: StageResult | None = None) -> dict[str, float]:
    """Record counts, dev loss and scores before/after, decode speed and memory per variant
    (the benchmark's first engine and smallest batch), the int4 size ratio and, with preference
    tuning, each model's preference accuracy and margin on the dev pairs."""
    m: dict[str, float] = {"train_records": data.out.train_records,
                           "dev_records": data.out.dev_records,
                           "dev_loss_before": adapter.out.eval_loss_before,
                           "dev_loss_after": adapter.out.eval_loss_after}
    scores = generations.out.scores
    for key in SCORES:
        for who, when in COLUMNS.items():
            if f"{who}_{key}" in scores:               # supervised: with preference tuning
                m[f"dev_{key}_{when}"] = scores[f"{who}_{key}"]
    rows = read_rows(bench.out.benchmark_json)
    if rows:
        engine, batch = rows[0].engine, min(r.batch for r in rows)
        for r in rows:
            if r.engine == engine and r.batch == batch:
                name = r.variant.replace("+", "_")
                m[f"decode_tok_s.{name}"] = r.decode_tok_s
                m[f"peak_memory_mib.{name}"] = r.peak_cuda_mib or r.peak_rss_mib
    if int4 is not None:
        m["int4_size_ratio"] = int4.out.size_ratio_vs_merged
    if preference is not None:
        m |= {f"dev_{k}": v for k, v in preference.out.scores.items()}
    return m


def generations_table(generations: StageResult) -> dict[str, list[Any]]:
    """The generations stage's dev prompts with their reference, the answers before, of the
    supervised model (after preference tuning) and after, and each answer's scores: one row per
    prompt, columns as lists."""
    dev = read_json(generations.out.generations_json)["dev"]
    present = [(who, column) for who, column in COLUMNS.items() if dev and column in dev[0]]
    table: dict[str, list[Any]] = {
        "prompt": [e["prompt"][-1]["content"] if isinstance(e["prompt"], list) else e["prompt"]
                   for e in dev],
        "reference": [e["reference"] for e in dev],
        **{column: [e[column] for e in dev] for _, column in present},
        "scored": [e["scored"] for e in dev]}
    for key in SCORES:
        table |= {f"{key}_{column}": [e["scores"][who][key] for e in dev]
                  for who, column in present}
    return table


def log_headline(client: Any, run_id: str, metrics: dict[str, float],
                 table: dict[str, list[Any]]) -> None:
    """Both on the parent run `run_id`."""
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()])
    client.log_table(run_id, data=table, artifact_file=GENERATIONS_TABLE)
