"""The data flow for real: Prefect (temporary local server) + MLflow (sqlite), cache behaviour
across flow runs, and failure bookkeeping."""

from __future__ import annotations

import shutil

import pytest
from mlflow import MlflowClient

from flows.data import data_pipeline
from flows.tracking import tracking_uri
from tasks.common import REPO_DIR, DataError
from tasks.config import DataConfig

SAMPLE = REPO_DIR / "data" / "sample" / "plant_care_qa.txt"


def children(client: MlflowClient, parent_id: str) -> dict[str, object]:
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.info.run_name: r for r in runs}


def statuses(result) -> dict[str, bool]:
    return {row["stage"]: row["cached"] for row in result["stages"]}


def test_data_flow_tracks_caches_and_recomputes(tmp_path):
    corpus = tmp_path / "qa.txt"
    shutil.copy(SAMPLE, corpus)
    client = MlflowClient(tracking_uri())

    first = data_pipeline(DataConfig(source=corpus))
    assert statuses(first) == {"ingest": False, "conversations": False, "validate": False}
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect.flow_run_id"]
    kids = children(client, parent.info.run_id)
    assert set(kids) == {"ingest", "conversations", "validate"}
    arts = {a.path for a in client.list_artifacts(kids["conversations"].info.run_id)}
    assert {"train_json", "dev_json", "stage_result.json"} <= arts
    assert {a.path for a in client.list_artifacts(kids["ingest"].info.run_id, "raw")} == \
        {"raw/qa.txt"}
    contexts = {i.tags[0].value for i in kids["conversations"].inputs.dataset_inputs}
    assert contexts == {"training", "evaluation"}
    assert kids["conversations"].data.metrics["train_records"] == 239

    corpus.touch()                                   # touched but unchanged: all cache hits
    second = data_pipeline(DataConfig(source=corpus))
    assert statuses(second) == {"ingest": True, "conversations": True, "validate": True}
    reused = children(client, second["mlflow_run_id"])["conversations"]
    assert reused.data.tags["pipeline.cache"] == "hit"
    assert reused.data.tags["pipeline.reused_from_run_id"] == kids["conversations"].info.run_id

    text = corpus.read_text(encoding="utf-8")        # one changed answer: all recomputed
    corpus.write_text(text.replace("\n", "（已修订）\n", 2).replace("（已修订）\n", "\n", 1),
                      encoding="utf-8")
    third = data_pipeline(DataConfig(source=corpus))
    assert statuses(third) == {"ingest": False, "conversations": False, "validate": False}
    assert third["files"] != first["files"]


def test_bad_input_fails_flow_and_mlflow_run(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("问题一？\n答案一。\n\n问题二？\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.txt:4: question .* has no answer line"):
        data_pipeline(DataConfig(source=bad))
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name("finetune-pipeline")
    last = client.search_runs([exp.experiment_id], "tags.`pipeline.kind` = 'data'",
                              order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert last.info.status == "FAILED"
    failed = children(client, last.info.run_id)["ingest"]
    assert failed.info.status == "FAILED" and "no answer line" in failed.data.tags["pipeline.error"]
