"""Nightly retraining with a champion gate (deployment `nightly-retrain`, cron 02:00 local time).

    python -m flows.nightly                                  # what the schedule runs
    python -m flows.nightly --set data.source=data/incoming --gate metric=bleu_4

1. `build`: the pipeline's stages run again (flows/pipeline.py). Every stage is cached by
   content, so unchanged data (and code and config) means every stage is a cache hit and
   registration finds the existing version: no new model version. New or changed input files
   change the digests and recompute what depends on them.
2. `evaluate_candidates`, before anything is registered: the new merged model (challenger) and
   the model under the registry alias `champion` are compared on the same, current dev set, plus
   the out-of-domain probes (tasks/evaluate/gate.py): the challenger's answers are the
   generations stage's, and the champion answers the same prompts the same way. A failure here fails the run like any other
   stage: nothing registered.
3. `register` (the pipeline's) registers the challenger as a version (idempotent by digest); it
   takes the alias only if the gate says so. The first model ever becomes champion.
4. `decide`, `record_decision`, `apply_decision`: the decision and both scores go to an MLflow
   child run `gate` (params, metrics, tags, gate_decision.json), to tags on the model version
   and the parent run, and to the Prefect artifact `champion-gate`.
"""

from __future__ import annotations

if __name__ == "__main__":        # the command line: set up before Prefect is imported
    from flows.ops.startup import prepare_cli

    prepare_cli()

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.ops import cli, commands
from flows.pipeline import Built, build, finish, register
from flows.running import PipelineRun, parent_run
from flows.tracking import Tracker
from tasks.runtime.results import StageName, StepName, stage_root
from tasks.runtime.paths import project_dir
from tasks.config import PipelineConfig
from tasks.config.methods import METHODS
from tasks.model.model_spec import ModelSpec
from flows.registry import RegisteredVersion, champion_version
from tasks.evaluate.gate import (
    Candidate,
    GateConfig,
    GateDecision,
    decide,
    evaluate_champion_stage,
    ood_retention,
    probe_answers,
)


# ------------------------------------------------------------------------------------------------
# Registry edge
# ------------------------------------------------------------------------------------------------
def local_model(version, tracking_uri: str) -> Path:
    """A local folder of a registered merged model: the content-addressed output of the merge
    (or merge_preference) stage if this machine built it, else downloaded once from the artifact store."""
    digest = version.tags.get("model_digest", "")
    for stage in (StageName.MERGE, StageName.MERGE_PREFERENCE):
        built = stage_root(stage) / digest
        if digest and (built / "config.json").is_file():
            return built
    import mlflow.artifacts

    dst = project_dir() / "outputs" / "champion" / (digest or f"v{version.version}")
    if not dst.is_dir():
        dst.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dst),
                                            tracking_uri=tracking_uri)
    found = [p.parent for p in dst.rglob("config.json")]
    if not found:
        raise FileNotFoundError(f"champion {version.name} v{version.version}: no model folder "
                                f"(config.json) under {version.source}")
    folder = found[0]
    tokenizer = folder.parent / "components" / "tokenizer"   # an MLflow transformers model
    if tokenizer.is_dir() and not (folder / "tokenizer_config.json").is_file():
        for f in tokenizer.iterdir():
            shutil.copy2(f, folder / f.name)
    return folder


def _scores_from_tags(version, cfg: GateConfig, digest: str) -> Candidate:
    tags = version.tags
    num = lambda key: float(tags[key]) if key in tags else None  # noqa: E731
    return Candidate(str(version.version), digest, num(f"gate.{cfg.metric}"),
                     num("gate.ood_retention"), num("gate.preference_accuracy"))


# ------------------------------------------------------------------------------------------------
# The gate
# ------------------------------------------------------------------------------------------------
def evaluate_candidates(run: PipelineRun, cfg: PipelineConfig, gate: GateConfig, built: Built
                        ) -> tuple[Candidate, Candidate | None]:
    """Challenger (the merged model, scored by the generations stage) and champion (scored
    here the same way) on the same dev set."""
    client = run.tracker.client
    merged = built.merged
    champ = champion_version(client, cfg.registry.model_name, gate.alias)
    if champ is not None and champ.tags.get("model_digest") == merged.digest:
        same = _scores_from_tags(champ, gate, merged.digest)
        return replace(same, version=None), same          # unchanged: nothing to evaluate

    scored = built.generations                # base ("before") and challenger ("after")
    columns = probe_answers(scored.out.generations_json)
    base_answers = columns["before"]
    preference = built.preference if gate.max_preference_drop is not None else None
    challenger = Candidate(None, merged.digest, scored.out.scores[f"tuned_{gate.metric}"],
                           ood_retention(columns["after"], base_answers),
                           None if preference is None else
                           100 * preference.scores.out.scores["tuned_preference_accuracy"])
    if champ is None:
        return challenger, None
    digest, folder = champ.tags.get("model_digest", ""), local_model(champ, run.tracker.uri)
    spec = ModelSpec(folder, built.dtype, digest=digest)     # as the challenger was compared
    cp = run.stage(evaluate_champion_stage, spec=spec, data=built.data,
                   probes_file=Path(cfg.report.probes_file), cfg=cfg.report)
    cp_preference = None
    if preference is not None:
        from tasks.evaluate.preference_eval import champion_preference_stage

        pref = run.stage(champion_preference_stage, pairs=preference.pairs, spec=spec)
        cp_preference = 100 * pref.out.scores["champion_preference_accuracy"]
    return challenger, Candidate(str(champ.version), digest, cp.out.scores[gate.metric],
                                 ood_retention(probe_answers(cp.out.evaluation_json)["answer"],
                                               base_answers),
                                 cp_preference)


def record_decision(tracker: Tracker, parent_id: str, decision: GateDecision,
                    gate: GateConfig) -> str:
    """The gate's child run (params, both scores, decision) + tags on the parent run."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = tracker.client
    child = client.create_run(tracker.experiment_id, run_name=StepName.GATE, tags={
        MLFLOW_PARENT_RUN_ID: parent_id, "pipeline.stage": StepName.GATE,
        "gate.decision": decision.outcome, "gate.reason": decision.reason[:5000]}).info.run_id
    tracker._log(child, params=gate.model_dump(), metrics=decision.metrics())
    client.log_dict(child, decision.as_dict(), "gate_decision.json")
    tracker.log_text(child, decision.markdown(), "gate_decision.md")
    tracker.finish(child, ok=True)
    tracker._log(parent_id, metrics={f"gate_{k}": v for k, v in decision.metrics().items()},
                 tags={"gate.decision": decision.outcome, "gate.reason": decision.reason[:5000],
                       "gate.run_id": child})
    return child


def apply_decision(client, decision: GateDecision, registered: list[RegisteredVersion],
                   gate: GateConfig, parent_id: str) -> dict[str, str]:
    """Tag the challenger's versions with the verdict; on promote, move the alias to them (the
    merged model and its int4 sibling). Returns {model name: champion version}."""
    champions = {}
    for v in registered:
        tags = {"gate.decision": decision.outcome, "gate.metric": decision.metric,
                "gate.run_id": parent_id}
        c = decision.challenger
        if c.score is not None:
            tags[f"gate.{decision.metric}"] = f"{c.score:.4f}"
        if c.ood is not None:
            tags["gate.ood_retention"] = f"{c.ood:.4f}"
        if c.preference is not None:
            tags["gate.preference_accuracy"] = f"{c.preference:.4f}"
        if decision.champion is None or decision.champion.digest != c.digest:
            for k, val in tags.items():
                client.set_model_version_tag(v.name, v.version, k, val)
        if decision.promote:
            client.set_registered_model_alias(v.name, gate.alias, v.version)
        current = champion_version(client, v.name, gate.alias)
        if current is not None:
            champions[v.name] = str(current.version)
    return champions


@flow(name="nightly-retrain", log_prints=True)
def nightly(config: PipelineConfig = PipelineConfig(),
            gate: GateConfig = GateConfig()) -> dict[str, Any]:
    """Retrain on the configured data (cache hits where nothing changed) and promote the new
    model to the registry alias `champion` only if it beats the current champion on the same
    dev set without forgetting more than the bound on out-of-domain probes."""
    if not METHODS[config.train.method].mergeable:
        mergeable = [name for name, m in METHODS.items() if m.mergeable]
        raise ValueError("nightly-retrain gates merged models (champion vs challenger, both "
                         f"standalone); train.method={config.train.method} yields a prefix "
                         f"adapter that cannot be merged: use {' or '.join(mergeable)}, or run "
                         "the full-pipeline deployment")
    if gate.max_preference_drop is not None and config.preference.method == "none":
        raise ValueError("gate.max_preference_drop compares preference accuracy, which a run "
                         "measures with preference tuning: set preference.method (dpo, orpo)")
    params = {**config.model_dump(mode="json"), "gate": gate.model_dump(mode="json")}
    with parent_run(config.experiment, "nightly", params) as run:
        built = build(run, config)
        challenger, champion = evaluate_candidates(run, config, gate, built)
        versions = register(run, config, built)
        mine = [v for v in versions if v.name.startswith(config.registry.model_name)]
        merged = next(v for v in mine if v.name == config.registry.model_name)
        decision = decide(replace(challenger, version=str(merged.version)), champion, gate)
        gate_run = record_decision(run.tracker, run.parent_id, decision, gate)
        champions = apply_decision(run.tracker.client, decision, mine, gate, run.parent_id)
        out = finish(run, built, versions)
    create_markdown_artifact(key="champion-gate", markdown=decision.markdown(),
                             description=f"Champion gate, MLflow run {run.parent_id}")
    print(decision.markdown())
    return {"mlflow_run_id": run.parent_id, "gate_run_id": gate_run,
            "decision": decision.as_dict(), "champions": champions, "stages": run.rows,
            "registered": out["registered"], "summary": out["summary"]}


def main(argv: list[str] | None = None) -> int:
    args, load = commands.COMMANDS["flows.nightly"].parse(argv, __doc__)

    def run(configs: tuple[PipelineConfig, GateConfig]) -> None:
        result = nightly(*configs)
        print(json.dumps(result["decision"], indent=2, default=str))
    return cli.run(load, run, args)


if __name__ == "__main__":
    sys.exit(main())
