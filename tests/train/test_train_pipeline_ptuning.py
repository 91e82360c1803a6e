"""The full pipeline flow with train.method=ptuning on a tiny config: a P-Tuning v2 prefix cannot
be merged into the weights, so merge and int4 are skipped, base + prefix adapter is benchmarked
and reported, and the prefix adapter is what gets registered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.pipeline import pipeline
from flows.tracking import tracking_uri
from tasks.runtime.paths import REPO_DIR
from tasks.config import PipelineConfig
from tests._ops_config import tiny

pytestmark = pytest.mark.slow


def test_ptuning_pipeline_skips_merge_and_registers_the_prefix(tmp_path):
    corpus = tmp_path / "plant_care_qa.txt"
    shutil.copy(REPO_DIR / "data" / "sample" / "plant_care_qa.txt", corpus)
    cfg = PipelineConfig.model_validate(tiny(data={"source": str(corpus)},
                                             train={"method": "ptuning", "save_steps": 5},
                                             experiment="ptuning-pipeline"))
    out = pipeline(cfg)
    stages = [r["stage"] for r in out["stages"]]
    assert "train" in stages and "merge" not in stages and "quantize" not in stages
    assert {r["variant"] for r in out["benchmark"]} == {"base", "base+adapter"}
    assert [v["name"] for v in out["registered"]] == ["plant-care-chat-prefix"]
    assert Path(out["report"]["report_html"]).is_file()

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name("ptuning-pipeline")
    train_run = next(r for r in client.search_runs([exp.experiment_id])
                     if r.info.run_name == "train")
    names = {a.path for a in client.list_artifacts(train_run.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/loss_curve.png",
            "adapter/sanity_check.md"} <= names
    assert train_run.data.metrics["eval_loss_after"] < train_run.data.metrics["eval_loss_before"]
    # the run's checkpoints are listed in MLflow (stage_result.json), pruned to the limit
    result = json.loads(Path(client.download_artifacts(train_run.info.run_id, "stage_result.json",
                                                       str(tmp_path))).read_text())
    checkpoints = result["info"]["checkpoints"]
    saved = int(train_run.data.metrics["global_step"]) // cfg.train.save_steps
    assert saved > cfg.train.save_total_limit == len(checkpoints)      # older ones pruned
    assert len(checkpoints) == train_run.data.metrics["checkpoints"]
    assert [c["name"] for c in checkpoints] == [f"checkpoint-{c['step']}" for c in checkpoints]
    assert all(Path(c["path"], "adapter_model.safetensors").is_file() for c in checkpoints)

    # the train stage's progress lines reach the Prefect task-run log (the UI's Logs tab)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    parent = client.get_run(train_run.data.tags["mlflow.parentRunId"])
    with get_client(sync_client=True) as prefect:
        logs = prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[parent.data.tags["prefect.flow_run_id"]])))
    steps = [log for log in logs if log.name == "tasks.train" and log.message.startswith("step ")]
    assert steps and all(log.task_run_id for log in steps), [log.message for log in logs][-20:]
    assert checkpoints[-1]["step"] == train_run.data.metrics["global_step"]
