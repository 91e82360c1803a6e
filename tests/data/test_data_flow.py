"""The data flow for real: Prefect (temporary local server) + MLflow (sqlite), cache behaviour
across flow runs (input bytes, touched files, changed parser code), bad input through the
flow (fail, or skip and count), and the data report's images in MLflow."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

import tasks.runtime.code_version as code_version
from flows.data import data_pipeline
from flows.tracking import tracking_uri
from tasks.runtime.paths import REPO_DIR
from tasks.runtime.errors import DataError
from tasks.config import DataConfig
from tests._ops_config import first_answer_marked

BAD = Path(__file__).parents[1] / "data" / "bad"
STAGES = ("ingest", "conversations", "validate", "data_report")
pytestmark = pytest.mark.server             # each test runs the flow on a Prefect server


def children(client: MlflowClient, parent_id: str) -> dict[str, object]:
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.info.run_name: r for r in runs}


def statuses(result) -> dict[str, bool]:
    return {row["stage"]: row["cached"] for row in result["stages"]}


def last_data_run(client: MlflowClient):
    exp = client.get_experiment_by_name("finetune-pipeline")
    return client.search_runs([exp.experiment_id], "tags.`pipeline.kind` = 'data'",
                              order_by=["attributes.start_time DESC"], max_results=1)[0]


def test_data_flow_tracks_caches_and_recomputes(tmp_path):
    # the sample with its first answer made this test's own (the same 239 + 102 records): other
    # tests of the session may have computed the sample itself already
    corpus = tmp_path / "qa.txt"
    corpus.write_text(first_answer_marked("（数据流）"), encoding="utf-8")
    client = MlflowClient(tracking_uri())

    first = data_pipeline(DataConfig(source=corpus))
    assert statuses(first) == dict.fromkeys(STAGES, False)
    assert gc.get_freeze_count() == 0, "the flow's end gives set-aside objects back to the gc"
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect.flow_run_id"]
    kids = children(client, parent.info.run_id)
    assert set(kids) == set(STAGES)
    arts = {a.path for a in client.list_artifacts(kids["conversations"].info.run_id)}
    assert {"train.json", "dev.json", "train.parquet", "stage_result.json"} <= arts
    assert {"qa.txt", "qa.json", "records.arrow"} <= {
        a.path for a in client.list_artifacts(kids["ingest"].info.run_id)}
    contexts = {i.tags[0].value for i in kids["conversations"].inputs.dataset_inputs}
    assert contexts == {"training", "evaluation"}
    assert kids["conversations"].data.metrics["train_records"] == 239
    report = kids["data_report"]
    shown = {a.path for a in client.list_artifacts(report.info.run_id)}
    assert {"chars_hist.png", "tokens_hist.png", "turns_hist.png", "data_report.md"} <= shown
    assert report.data.metrics["train_records"] == 239

    corpus.touch()                                   # touched but unchanged: all cache hits
    second = data_pipeline(DataConfig(source=corpus))
    assert statuses(second) == dict.fromkeys(STAGES, True)
    reused = children(client, second["mlflow_run_id"])["conversations"]
    assert reused.data.tags["pipeline.cache"] == "hit"
    assert reused.data.tags["pipeline.reused_from_run_id"] == kids["conversations"].info.run_id

    text = corpus.read_text(encoding="utf-8")        # one changed answer: all recomputed
    corpus.write_text(first_answer_marked("（已修订）", text), encoding="utf-8")
    third = data_pipeline(DataConfig(source=corpus))
    assert statuses(third) == dict.fromkeys(STAGES, False)
    assert third["files"] != first["files"]


def test_changed_parser_helper_recomputes_ingest_only(tmp_path, monkeypatch):
    corpus = tmp_path / "qa.txt"                     # this test's own, as above
    corpus.write_text(first_answer_marked("（解析）"), encoding="utf-8")
    data_pipeline(DataConfig(source=corpus))
    # the same repository, but the raw-text parser (a helper module of ingest) edited
    shutil.copytree(REPO_DIR / "tasks", tmp_path / "repo" / "tasks")
    parser = tmp_path / "repo" / "tasks" / "data" / "qa_text.py"
    parser.write_text(parser.read_text(encoding="utf-8").replace(
        "bad = size != 2", "bad = (size != 2) | (size > 2)"), encoding="utf-8")
    monkeypatch.setattr(code_version, "REPO_DIR", tmp_path / "repo")
    again = data_pipeline(DataConfig(source=corpus))
    # ingest re-ran; its output did not change, so everything downstream was a cache hit
    assert statuses(again) == {"ingest": False, "conversations": True, "validate": True,
                               "data_report": True}


def test_bad_input_fails_flow_and_mlflow_run(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("问题一？\n答案一。\n\n问题二？\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.txt:4: question .* has no answer line"):
        data_pipeline(DataConfig(source=bad))
    client = MlflowClient(tracking_uri())
    last = last_data_run(client)
    assert last.info.status == "FAILED"
    failed = children(client, last.info.run_id)["ingest"]
    assert failed.info.status == "FAILED" and "no answer line" in failed.data.tags["pipeline.error"]


def test_bad_corpus_through_the_flow_fails_or_skips_and_counts():
    client = MlflowClient(tracking_uri())
    with pytest.raises(DataError, match=r"mixed_formats.jsonl:3 record #2 at \$: this is an "
                                        r"adgen record"):
        data_pipeline(DataConfig(source=BAD / "mixed_formats.jsonl", on_error="skip"))
    failed = children(client, last_data_run(client).info.run_id)["ingest"]
    assert "one format" in failed.data.tags["pipeline.error"]

    result = data_pipeline(DataConfig(source=BAD / "wrong_type.json", on_error="skip"))
    kids = children(client, result["mlflow_run_id"])
    assert kids["ingest"].data.metrics["skipped_records"] == 1
    assert kids["ingest"].data.metrics["skipped.wrong-type"] == 1
    assert kids["data_report"].data.metrics["skipped_records"] == 1
    assert "skipped.json" in {a.path for a in client.list_artifacts(kids["ingest"].info.run_id)}
