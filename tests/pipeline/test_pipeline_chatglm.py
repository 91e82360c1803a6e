"""A ChatGLM2/3 or original GLM-4 folder as `base.path` (README "Which models"): the whole
pipeline converts it once and runs every method on it, never running the folder's code; a
folder that needs its own code is refused before any stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlflow import MlflowClient

from flows.pipeline import pipeline
from flows.tracking import tracking_uri
from tasks.runtime.errors import ConfigError
from tasks.runtime.files import read_json
from tasks.config import PipelineConfig
from tasks.config.methods import METHODS
from tests._chatglm import make_original
from tests._ops_config import stage_names, tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("originals")
    return {f: make_original(root / f, f, bin_weights=f == "chatglm2")
            for f in ("chatglm2", "chatglm3", "glm4")}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["chatglm3", "chatglm2", "glm4"])
def test_the_pipeline_runs_on_a_chatglm_folder(originals, family, method):
    folder = originals[family]
    cfg = PipelineConfig.model_validate(tiny(base={"path": str(folder)}, train={
        "method": method}, experiment=f"chatglm-{family}"))
    out = pipeline(cfg)
    expected = stage_names()
    if method == "ptuning":
        expected = [s for s in expected if s not in ("merge", "quantize")]
    assert [r["stage"] for r in out["stages"]] == expected
    assert not list(folder.glob("*.ran")), "the folder's own code was run"
    registered = [v["name"] for v in out["registered"]]
    assert registered == (["plant-care-chat-prefix"] if method == "ptuning" else
                          ["plant-care-chat", "plant-care-chat-int4"])
    client = MlflowClient(tracking_uri())
    exp = client.get_run(out["mlflow_run_id"]).info.experiment_id
    kids = {r.info.run_name: r for r in client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{out['mlflow_run_id']}'")}
    native = Path(kids["base"].data.tags["pipeline.output_path"])
    assert read_json(native / "config.json")["model_type"] == "glm"
    assert read_json(native / "conversion.json")["family"] == family
    adapter = read_json(Path(kids["train"].data.tags["pipeline.output_path"])
                        / "adapter_config.json")
    assert adapter["base_model_name_or_path"] == str(native), "trained on the converted model"
    report = Path(kids["data_report"].data.tags["pipeline.output_path"])
    assert str(folder) in read_json(report / "data_report.json")["token_unit"], \
        "token lengths in the family's own tokens"
    answers = read_json(Path(out["generations"]["generations_json"]))
    assert answers["dev"] and all(e["after"] for e in answers["dev"])


def test_a_folder_that_needs_its_own_code_is_refused_before_any_stage(tmp_path):
    folder = tmp_path / "internlm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "internlm2", "auto_map": {
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}}))
    cfg = PipelineConfig.model_validate(tiny(base={"path": str(folder)},
                                             experiment="refused"))
    state = pipeline(cfg, return_state=True)
    with pytest.raises(ConfigError, match="model_type 'internlm2' needs the folder's own "
                                          "Python code") as err:
        state.result()
    assert "\n" not in str(err.value)
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name("refused")
    [parent] = client.search_runs([exp.experiment_id])
    assert parent.info.status == "FAILED"
    assert client.search_runs([exp.experiment_id], "tags.`mlflow.parentRunId` != ''") == []
