"""The data stage alone: raw Q/A text -> QA JSON -> conversations -> 70/30 split -> validated.

    python -m flows.data --set source=data/sample/plant_care_qa.txt --set shuffle_seed=7
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow

from flows.stages import PipelineRun, conversations_task, ingest_task, parent_run, \
    validate_task
from tasks.common import SCHEMA_DIR, StageResult
from tasks.config import DataConfig


def data_stages(run: PipelineRun, cfg: DataConfig) -> tuple[StageResult, StageResult]:
    """ingest -> conversations -> validate; returns (QA result, conversations result)."""
    source = Path(cfg.source)
    qa = run.stage(ingest_task, source=source,
                   artifacts=lambda r: {"raw": str(source), **r.files},
                   datasets=lambda r: {"qa": r.file("qa_json")})
    data = run.stage(conversations_task, qa=qa, system_prompt=cfg.system_prompt,
                     train_ratio=cfg.train_ratio, shuffle_seed=cfg.shuffle_seed,
                     datasets=lambda r: {"training": r.file("train_json"),
                                         "evaluation": r.file("dev_json")})
    run.stage(validate_task, qa=qa, data=data, artifacts=lambda r: {"schemas": str(SCHEMA_DIR)})
    run.tracker.client.set_tag(run.parent_id, "data_digest", data.digest)
    return qa, data


@flow(name="data-pipeline", log_prints=True)
def data_pipeline(config: DataConfig = DataConfig(),
                  experiment: str = "finetune-pipeline") -> dict[str, Any]:
    """Data stage only: ingest, convert, split 70/30 and validate, tracked in MLflow."""
    with parent_run(experiment, "data", config.model_dump(mode="json")) as run:
        _, data = data_stages(run, config)
        print(f"train.json: {data.files['train_json']} ({data.metrics['train_records']:.0f})\n"
              f"dev.json:   {data.files['dev_json']} ({data.metrics['dev_records']:.0f})")
        return {"mlflow_run_id": run.parent_id, "files": data.files, "stages": run.rows}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from tasks.config import load_config
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="a DataConfig field, e.g. shuffle_seed=7")
    args = ap.parse_args(argv)
    data_pipeline(load_config(None, [f"data.{o}" for o in args.overrides]).data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
