"""Nightly retraining with the champion gate: the rule on numbers, then the real flow (tiny
pipeline, real evaluation, MLflow registry in sqlite, Prefect) for promote, keep, unchanged data
and failure."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.nightly import nightly
from flows.tracking import tracking_uri
from tasks.runtime.paths import REPO_DIR
from tasks.runtime.files import read_json
from tasks.config import PipelineConfig
from tasks.evaluate.gate import Candidate, GateConfig, decide, ood_retention
from tests._ops_config import PIPELINE_STAGES, first_answer_marked, tiny

MODEL = "nightly-chat"                       # own registered model + experiment: test isolation
EXPERIMENT = "nightly-gate-tests"


# ------------------------------------------------------------------------------------------------
# The rule
# ------------------------------------------------------------------------------------------------
def test_first_model_becomes_champion():
    d = decide(Candidate("1", "aaa", 10.0, 50.0), None, GateConfig())
    assert d.promote and "First model" in d.reason and d.outcome == "promote"


def test_unchanged_model_is_kept_without_scores():
    champ = Candidate("3", "same")
    d = decide(Candidate("3", "same"), champ, GateConfig())
    assert not d.promote and "Unchanged model" in d.reason


@pytest.mark.parametrize("challenger, champion, margin, promote", [
    (31.0, 30.0, 0.0, True),              # strictly better
    (30.0, 30.0, 0.0, False),             # a tie keeps the champion
    (29.0, 30.0, 0.0, False),             # worse
    (30.4, 30.0, 0.5, False),             # better, but not by the required margin
    (29.8, 30.0, -0.5, True),             # a negative margin tolerates a small regression
])
def test_metric_rule(challenger, champion, margin, promote):
    cfg = GateConfig(metric="bleu_4", min_improvement=margin)
    d = decide(Candidate("2", "new", challenger, 80.0), Candidate("1", "old", champion, 80.0), cfg)
    assert d.promote is promote
    assert d.metrics() == {"challenger_bleu_4": challenger, "champion_bleu_4": champion,
                           "challenger_ood_retention": 80.0, "champion_ood_retention": 80.0,
                           "promoted": float(promote)}


def test_out_of_domain_bound():
    cfg = GateConfig(max_ood_drop=5.0)
    champion = Candidate("1", "old", 30.0, 80.0)
    assert decide(Candidate("2", "new", 35.0, 75.0), champion, cfg).promote      # drop 5: ok
    kept = decide(Candidate("2", "new", 35.0, 74.0), champion, cfg)             # drop 6: no
    assert not kept.promote and "out-of-domain retention fell 6.00" in kept.reason
    md = kept.markdown()
    assert "KEEP" in md and "| dev rouge_l (same dev set) | 35.00 | 30.00 |" in md


def test_preference_bound():
    cfg = GateConfig(max_preference_drop=2.0)
    champion = Candidate("1", "old", 30.0, 80.0, 90.0)
    assert decide(Candidate("2", "new", 35.0, 80.0, 88.0), champion, cfg).promote   # drop 2: ok
    kept = decide(Candidate("2", "new", 35.0, 80.0, 87.5), champion, cfg)
    assert not kept.promote
    assert "preference accuracy on the dev pairs fell 2.50 points (90.00 -> 87.50" in kept.reason
    assert "| dev preference accuracy (%) | 87.50 | 90.00 |" in kept.markdown()
    assert kept.metrics()["challenger_preference_accuracy"] == 87.5
    # not asked for: not checked, and not shown
    plain = decide(Candidate("2", "new", 35.0, 80.0, 10.0), champion, GateConfig())
    assert plain.promote and "preference" not in plain.markdown()
    with pytest.raises(ValueError, match="max_preference_drop needs both candidates'"):
        decide(Candidate("2", "new", 35.0, 80.0), champion, cfg)


def test_decide_needs_both_evaluations():
    with pytest.raises(ValueError, match="evaluated"):
        decide(Candidate("2", "new", 1.0, None), Candidate("1", "old", 1.0, 1.0), GateConfig())


def test_ood_retention_is_similarity_to_the_base_answers():
    base = ["多浇水，放在阳光下。", "巴黎是法国的首都。"]
    assert ood_retention(base, base) == pytest.approx(100.0)
    assert ood_retention(["完全无关的回答", "另一句话"], base) < 20.0
    with pytest.raises(ValueError, match="line up"):
        ood_retention(base[:1], base)


# ------------------------------------------------------------------------------------------------
# The flow, for real
# ------------------------------------------------------------------------------------------------
def config(**sections) -> PipelineConfig:
    return PipelineConfig.model_validate({**tiny(**sections), "experiment": EXPERIMENT,
                                          "registry": {"model_name": MODEL}})


def gate(**fields) -> GateConfig:
    return GateConfig(**fields)              # it scores what the tiny config's `report` says


@pytest.fixture(scope="module")
def client() -> MlflowClient:
    return MlflowClient(tracking_uri())


@pytest.fixture(scope="module")
def first(client):
    """The first nightly run ever: builds everything, and its model becomes champion."""
    return nightly(config(), gate())


def versions(client: MlflowClient) -> dict[str, dict]:
    return {str(mv.version): mv.tags for mv in client.search_model_versions(f"name = '{MODEL}'")}


def champion(client: MlflowClient, name: str = MODEL) -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)


def children(client: MlflowClient, parent_id: str) -> dict[str, object]:
    exp = client.get_run(parent_id).info.experiment_id
    return {r.info.run_name: r for r in
            client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")}


def gate_artifact(parent_run) -> str:
    """Markdown of the Prefect artifact `champion-gate` of the run's Prefect flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, \
        ArtifactFilterKey

    flow_run_id = parent_run.data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["champion-gate"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert len(arts) == 1, arts
    return arts[0].data


@pytest.mark.server
def test_nightly_first_model_becomes_champion(client, first):
    d = first["decision"]
    assert d["outcome"] == "promote" and d["champion"] is None
    assert d["challenger"]["score"] is not None and d["challenger"]["ood"] is not None
    assert first["champions"] == {MODEL: "1", f"{MODEL}-int4": "1"}
    assert champion(client) == "1" and champion(client, f"{MODEL}-int4") == "1"
    assert versions(client)["1"]["gate.decision"] == "promote"

    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["gate.decision"] == "promote"
    kids = children(client, parent.info.run_id)
    assert PIPELINE_STAGES | {"gate"} <= set(kids)
    # the challenger's and the base's answers are the generations stage's: nothing answers twice
    assert not any(name.startswith("evaluate_") for name in kids), sorted(kids)
    scored = client.get_run(kids["generations"].info.run_id).data.metrics
    assert d["challenger"]["score"] == pytest.approx(scored["tuned_rouge_l"])
    g = kids["gate"]
    assert g.data.params["metric"] == "rouge_l" and "challenger_rouge_l" in g.data.metrics
    arts = {a.path for a in client.list_artifacts(g.info.run_id)}
    assert {"gate_decision.json", "gate_decision.md"} <= arts
    assert "Champion gate: **PROMOTE**" in gate_artifact(parent)


@pytest.mark.server
def test_nightly_unchanged_data_is_all_cache_hits_and_no_new_version(client, first):
    before = versions(client)
    again = nightly(config(), gate())
    assert all(row["cached"] for row in again["stages"]), again["stages"]
    assert [r["created"] for r in again["registered"]] == [False, False]
    assert versions(client).keys() == before.keys() and champion(client) == "1"
    assert again["decision"]["outcome"] == "keep"
    assert "Unchanged model" in again["decision"]["reason"]
    kids = children(client, again["mlflow_run_id"])
    assert not any(name.startswith("evaluate_") for name in kids)       # nothing re-evaluated


@pytest.fixture(scope="module")
def new_data(tmp_path_factory) -> Path:
    """Last night's corpus with its first answer revised, plus three new Q/A pairs."""
    path = tmp_path_factory.mktemp("incoming") / "plant_care_qa.txt"
    text = first_answer_marked("（修订）")
    path.write_text(text.rstrip() + "\n\n" + "\n\n".join([
        "琴叶榕掉叶子是什么原因？\n多半是挪动了位置或浇水不匀，固定位置、见干见湿即可。",
        "虎皮兰冬天多久浇一次水？\n冬季约一个月一次，盆土完全干透再浇。",
        "茉莉花不开花怎么办？\n增加光照，花期前追施磷钾肥。"]) + "\n", encoding="utf-8")
    return path


@pytest.mark.server
def test_nightly_new_data_retrains_and_the_gate_keeps_a_champion_not_beaten(client, first,
                                                                            new_data):
    # New and changed data: every stage recomputes, and the gate compares the new model with the
    # champion on the NEW dev set. It must beat it by more than 1000 points -- impossible on a
    # 0-100 score.
    out = nightly(config(data={"source": str(new_data)}), gate(min_improvement=1000.0))
    assert not any(row["cached"] for row in out["stages"]), out["stages"]
    assert all(r["created"] for r in out["registered"]), out["registered"]
    d = out["decision"]
    assert d["outcome"] == "keep" and "Kept the champion" in d["reason"]
    assert d["champion"]["version"] == "1" and d["challenger"]["version"] == "2"
    assert d["champion"]["score"] is not None and d["challenger"]["score"] is not None
    assert champion(client) == "1" and champion(client, f"{MODEL}-int4") == "1"
    assert versions(client)["2"]["gate.decision"] == "keep"         # registered, not champion

    kids = children(client, out["mlflow_run_id"])
    # both models answered the SAME dev prompts, in the same order and batches
    generations = Path(kids["generations"].data.tags["pipeline.output_path"])
    champion_run = Path(kids["evaluate_champion"].data.tags["pipeline.output_path"])
    challenger = read_json(generations / "generations.json")
    champion_ = read_json(champion_run / "evaluation.json")
    assert [r["reference"] for r in champion_["dev"]] == \
        [r["reference"] for r in challenger["dev"]]
    assert [r["scored"] for r in champion_["dev"]] == [True, True]      # report.eval_examples
    assert (champion_["max_new_tokens"], champion_["batch_size"]) == \
        (challenger["max_new_tokens"], challenger["batch_size"])
    m = kids["gate"].data.metrics
    assert m["champion_rouge_l"] == d["champion"]["score"] and m["promoted"] == 0.0
    parent = client.get_run(out["mlflow_run_id"])
    assert "Champion gate: **KEEP**" in gate_artifact(parent)


@pytest.mark.server
def test_nightly_promotes_a_challenger_that_passes_the_gate(client, first, new_data):
    # The same new model (all cache hits, its evaluations too), under a gate it passes.
    out = nightly(config(data={"source": str(new_data)}),
                  gate(min_improvement=-100.0, max_ood_drop=100.0))
    assert all(row["cached"] for row in out["stages"]), out["stages"]
    d = out["decision"]
    assert d["outcome"] == "promote" and d["reason"].startswith("Promoted:")
    assert d["champion"]["version"] == "1"
    new = d["challenger"]["version"]
    assert champion(client) == new == out["champions"][MODEL]
    assert champion(client, f"{MODEL}-int4") == out["champions"][f"{MODEL}-int4"]
    assert versions(client)[new]["gate.decision"] == "promote"
    decision = client.get_run(out["gate_run_id"]).data
    assert decision.tags["gate.decision"] == "promote" and decision.metrics["promoted"] == 1.0


@pytest.mark.server
def test_nightly_failed_stage_fails_both_runs_and_registers_nothing(client, first, tmp_path):
    bad = tmp_path / "incoming.txt"
    shutil.copy(REPO_DIR / "data" / "sample" / "plant_care_qa.txt", bad)
    with open(bad, "a", encoding="utf-8") as f:
        f.write("\n\n一个没有答案的问题？\n")                      # unpaired: ingest refuses it
    before, alias = versions(client), champion(client)

    state = nightly(config(data={"source": str(bad)}), gate(), return_state=True)
    assert state.is_failed()
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    last = client.search_runs([exp], "tags.`pipeline.kind` = 'nightly'",
                              order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert last.info.status == "FAILED" and "gate.decision" not in last.data.tags
    kids = children(client, last.info.run_id)
    assert kids["ingest"].info.status == "FAILED" and "gate" not in kids
    assert versions(client) == before and champion(client) == alias


@pytest.mark.server
def test_nightly_refuses_ptuning_before_anything_runs(client, first):
    runs_before = len(client.search_runs([client.get_experiment_by_name(EXPERIMENT)
                                          .experiment_id]))
    with pytest.raises(ValueError, match="ptuning yields a prefix adapter"):
        nightly(config(train={"method": "ptuning"}), gate())
    assert len(client.search_runs([client.get_experiment_by_name(EXPERIMENT)
                                   .experiment_id])) == runs_before
