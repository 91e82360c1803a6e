"""The data stage alone: any supported input -> conversations -> train/dev split -> validated,
with a data report (counts, skipped and duplicate records, length histograms) in MLflow.

    python -m flows.data --set source=data/sample/plant_care_qa.txt --set shuffle_seed=7
    python -m flows.data --set source=my_alpaca.jsonl --set on_error=skip
"""

from __future__ import annotations

if __name__ == "__main__":        # the command line: set up before Prefect is imported
    from flows.ops.startup import prepare_cli

    prepare_cli()

import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.mlflow_files import DatasetFile
from flows.running import PipelineRun, parent_run
from tasks.runtime.paths import SCHEMA_DIR
from tasks.runtime.results import StageResult
from tasks.config import DataConfig
from tasks.data import conversations, data_report, ingest, validate
from tasks.data.dataset_io import QA

#: inputs bigger than this are not copied into MLflow (their digest is logged instead)
RAW_ARTIFACT_BYTES = 64 << 20


def _with_raw(source: Path, result: StageResult) -> dict[str, str]:
    """The ingest artifacts plus the raw input, unless it is big or a file named like one of
    the outputs (files are logged at the artifact root)."""
    files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
    small = sum(p.stat().st_size for p in files) <= RAW_ARTIFACT_BYTES
    clash = source.is_file() and source.name in {Path(f).name for f in result.files.values()}
    return {**({"raw": str(source)} if small and not clash else {}), **result.files}


def data_stages(run: PipelineRun, cfg: DataConfig) -> tuple[StageResult, StageResult]:
    """ingest -> conversations -> validate -> data report; returns (ingest result, conversations
    result: its output holds train_json and dev_json)."""
    source = Path(cfg.source)
    qa = run.stage(ingest.ingest, source=source, fmt=cfg.format, on_error=cfg.on_error,
                   max_chars=cfg.max_chars,
                   artifacts=lambda r: _with_raw(source, r),
                   datasets=lambda r: {"qa": DatasetFile(r.out.qa_json, QA, r.out.qa_pairs)}
                   if r.out.qa_json else {})
    if qa.out.skipped_records:
        get_run_logger().warning(
            "skipped %d malformed record(s) of %s (%s); see skipped.json and the data report",
            qa.out.skipped_records, source, qa.out.skipped)
    data = run.stage(conversations.stage, qa=qa, system_prompt=cfg.system_prompt,
                     train_ratio=cfg.train_ratio, shuffle_seed=cfg.shuffle_seed,
                     split_by=cfg.split_by, duplicates=cfg.duplicates, source=str(source),
                     datasets=lambda r: {"training": r.out.train_parquet,
                                         "evaluation": r.out.dev_parquet})
    run.stage(validate.stage, qa=qa, data=data, artifacts=lambda r: {"schemas": str(SCHEMA_DIR)})
    run.stage(data_report.stage, qa=qa, data=data,
              tokenizer=Path(cfg.tokenizer) if cfg.tokenizer else None)
    run.tracker.client.set_tag(run.parent_id, "data_digest", data.digest)
    return qa, data


@flow(name="data-pipeline", log_prints=True)
def data_pipeline(config: DataConfig = DataConfig(),
                  experiment: str = "finetune-pipeline") -> dict[str, Any]:
    """Data stage only: ingest any supported format, convert, split and validate, with a data
    report; tracked in MLflow."""
    with parent_run(experiment, "data", config.model_dump(mode="json")) as run:
        _, data = data_stages(run, config)
        print(f"train.json: {data.out.train_json} ({data.out.train_records})\n"
              f"dev.json:   {data.out.dev_json} ({data.out.dev_records})")
        return {"mlflow_run_id": run.parent_id, "files": data.files, "stages": run.rows}


def main(argv: list[str] | None = None) -> int:
    from flows.ops import cli, commands

    args, load = commands.COMMANDS["flows.data"].parse(argv, __doc__)
    return cli.run(load, data_pipeline, args)


if __name__ == "__main__":
    sys.exit(main())
