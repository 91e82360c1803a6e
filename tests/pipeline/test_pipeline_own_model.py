"""`base.path`: the same pipeline flow on a user's own Hugging Face model folder instead of the
embedded default (here a tiny Llama saved offline with its own BPE tokenizer and chat template),
and a wrong `base.path` failing the base stage with a clear error that MLflow records."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.pipeline import pipeline
from flows.tracking import tracking_uri
from tasks.runtime.files import read_json
from tasks.config import PipelineConfig
from tasks.model.modeling import load_tokenizer
from tests._ops_config import stage_names, tiny
from tests._tiny_model import make_base

pytestmark = pytest.mark.slow


def children(client: MlflowClient, parent_id: str) -> dict:
    exp = client.get_run(parent_id).info.experiment_id
    return {r.info.run_name: r for r in
            client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")}


def test_pipeline_runs_on_a_local_model_folder(tmp_path):
    model = make_base(tmp_path / "my-chat-model")
    cfg = PipelineConfig.model_validate(tiny(base={"path": str(model)},
                                             registry={"model_name": "own-model-chat"},
                                             experiment="own-model"))
    out = pipeline(cfg)
    assert [r["stage"] for r in out["stages"]] == stage_names()

    client = MlflowClient(tracking_uri())
    kids = children(client, out["mlflow_run_id"])
    base = kids["base"]
    assert base.info.status == "FINISHED" and base.data.params["path"] == str(model)
    assert base.data.tags["pipeline.output_path"] == str(model.resolve())
    # token lengths in the data report are the user's model's tokens
    report = kids["data_report"].data.tags["pipeline.output_path"]
    unit = read_json(Path(report) / "data_report.json")["token_unit"]
    assert unit.startswith("tokens of ") and str(model) in unit
    assert f"(vocabulary {len(load_tokenizer(model))})" in unit
    # the adapter was trained on that model, and the merged model carries its tokenizer
    adapter = read_json(Path(kids["train"].data.tags["pipeline.output_path"])
                        / "adapter_config.json")
    assert adapter["base_model_name_or_path"] == str(model.resolve())
    merged = Path(kids["merge"].data.tags["pipeline.output_path"])
    assert load_tokenizer(merged).get_vocab() == load_tokenizer(model).get_vocab()
    assert [v["name"] for v in out["registered"]] == ["own-model-chat", "own-model-chat-int4"]
    # a model's first version is its champion: `make run` then `make serve` serves it
    assert out["crowned"] == out["registered"]
    for v in out["registered"]:
        assert client.get_model_version_by_alias(v["name"], "champion").version == v["version"]
    assert "its first version: @champion" in out["summary"]
    again = pipeline(cfg)                          # the same model: nothing new, nothing moved
    assert again["crowned"] == [] and [v["created"] for v in again["registered"]] == [False] * 2


def test_a_wrong_base_path_fails_the_base_stage_and_says_why(tmp_path):
    missing = tmp_path / "no-such-model"
    cfg = PipelineConfig.model_validate(tiny(base={"path": str(missing)},
                                             experiment="own-model-missing"))
    state = pipeline(cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="no such model folder") as err:
        state.result()
    assert str(missing) in str(err.value)

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name("own-model-missing")
    [parent] = client.search_runs([exp.experiment_id], "tags.`pipeline.kind` = 'pipeline'")
    assert parent.info.status == "FAILED"
    kids = children(client, parent.info.run_id)
    assert kids["base"].info.status == "FAILED"
    assert "no such model folder" in kids["base"].data.tags["pipeline.error"]
    assert "train" not in kids
