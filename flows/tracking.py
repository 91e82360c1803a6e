"""MLflow edge: one parent run per pipeline run, one child run per stage.

Everything goes through `MlflowClient` with explicit run ids (no fluent active-run state, which
is thread-local: `nested=True` from a Prefect worker thread silently makes a top-level run).
A stage served from Prefect's cache still gets its child run: tagged `pipeline.cache=hit`, with
its metrics, and `pipeline.reused_from_run_id` pointing at the run that computed it and holds
the artifacts (if that run is gone, the artifacts are uploaded again from disk), and nothing
is logged again: no artifact is copied and no record is read (see `flows.mlflow_files`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from flows.ops.home import tracking_uri
from flows.ops.hygiene import ending, owner_tags
from flows.ops.databases import seed_mlflow
from flows.mlflow_files import DatasetFile, content_digest, dataset_input, log_artifacts
from tasks.runtime.results import StageResult
from tasks.runtime.files import file_lock
from tasks.runtime.paths import project_dir

CACHE_TAG, RESULT_TAG, REUSED_TAG = "pipeline.cache", "pipeline.result_id", \
    "pipeline.reused_from_run_id"
ERROR_TAG, INVALIDATED_TAG = "pipeline.error", "pipeline.cache_invalidated"


def _set_fluent_tracking_uri(uri: str) -> None:
    """`mlflow.set_tracking_uri(uri)` (for MLflow's fluent API, e.g. `log_model`), keeping this
    process's environment as it was: MLflow also exports the URI as `MLFLOW_TRACKING_URI`, which
    `tracking_uri()` would then take for the user's own setting, and every later run in this
    process (a notebook, the tests) would track into this run's store, whatever its home."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/"))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, ensure_ascii=False, default=str) if isinstance(
                v, (list, tuple)) else str(v)
    return out


def step_metrics(result: StageResult) -> list[Metric]:
    """A stage's `history` (`[{"step": n, "loss": x, ...}]`) as MLflow step metrics."""
    out = []
    for entry in result.history:
        step = int(entry.get("step", 0))
        out += [Metric(k, float(v), 0, step) for k, v in entry.items()
                if k != "step" and isinstance(v, (int, float))]
    return out


class Tracker:
    def __init__(self, experiment: str):
        self.uri = tracking_uri()
        # the first run on a new PIPELINE_HOME creates the DB (a copy of its template,
        # flows/ops/databases.py, made before MlflowClient opens, i.e. creates, it) and the
        # experiment: two runs started together must not both
        with file_lock("mlflow-db"):
            seed_mlflow(self.uri)
            _set_fluent_tracking_uri(self.uri)
            self.client = MlflowClient(self.uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = (project_dir() / "mlruns").as_uri() if _is_local(self.uri) else None
                self.experiment_id = self.client.create_experiment(
                    experiment, location,
                    tags={"mlflow.experimentKind": "custom_model_development"})  # runs view
            else:
                self.experiment_id = exp.experiment_id
        self.parent_id: str | None = None

    # -- runs ------------------------------------------------------------------------------
    def start_parent(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.parent_id = run.info.run_id
        self._log(self.parent_id, params=flatten(params))
        return self.parent_id

    def _child(self, stage: str, tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=stage,
            tags={MLFLOW_PARENT_RUN_ID: self.parent_id, "pipeline.stage": stage, **owner_tags(),
                  **(tags or {})})
        return run.info.run_id

    def _log(self, run_id: str, *, params: dict[str, Any] | None = None,
             metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None,
             step_metrics: Iterable[Metric] = ()) -> None:
        ms = [Metric(k, float(v), 0, 0) for k, v in (metrics or {}).items()] + list(step_metrics)
        ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(ms), 1), 900):       # log_batch caps 1000 metrics a call
            self.client.log_batch(run_id, metrics=ms[i:i + 900], params=ps if i == 0 else [],
                                  tags=ts if i == 0 else [])

    def finish(self, run_id: str, ok: bool) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def end_with_error(self, run_id: str, error: BaseException) -> None:
        """End a run that an exception ended: FAILED with the error, or KILLED by a signal
        (Ctrl-C, SIGTERM); children it left RUNNING end the same way."""
        status, reason = ending(error)
        open_children = self.client.search_runs(
            [self.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}' and "
                                  "attributes.status = 'RUNNING'")
        for run in [*open_children, self.client.get_run(run_id)]:
            self.client.set_tag(run.info.run_id, ERROR_TAG, reason[:5000])
            self.client.set_terminated(run.info.run_id, status)

    def url(self, run_id: str) -> str:
        base = self.uri if self.uri.startswith("http") else "http://127.0.0.1:5000"
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    # -- stages ------------------------------------------------------------------------------
    def origin_of(self, result: StageResult) -> str | None:
        """The run that really computed this result and holds all its artifacts (it finished:
        a run killed while uploading them does not count), if it exists."""
        runs = self.client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=f"tags.`{RESULT_TAG}` = '{result.result_id}' and "
                          f"tags.`{CACHE_TAG}` != 'hit' and attributes.status = 'FINISHED'")
        return runs[0].info.run_id if runs else None

    def log_stage(self, result: StageResult, *, cached: bool, seconds: float,
                  params: dict[str, Any] | None = None,
                  artifacts: dict[str, str] | None = None,
                  datasets: dict[str, Path | DatasetFile] | None = None,
                  extra_metrics: dict[str, float] | None = None,
                  invalidated: str | None = None) -> tuple[str, str]:
        """Child run for a finished stage; returns (child run id, run id holding artifacts).
        `extra_metrics` are this run's own figures (e.g. peak memory), beside the result's;
        `invalidated`: why a cached result was recomputed (tag pipeline.cache=invalidated)."""
        origin = self.origin_of(result) if cached else None
        cache = "invalidated" if invalidated else "hit" if cached else "computed"
        run_id = self._child(result.stage, {CACHE_TAG: cache, RESULT_TAG: result.result_id,
                                            **({REUSED_TAG: origin} if origin else {}),
                                            **({INVALIDATED_TAG: invalidated[:5000]}
                                               if invalidated else {})})
        steps = step_metrics(result)
        self._log(run_id, params=params,
                  metrics={**result.metrics, **(extra_metrics or {}), "stage_seconds": seconds},
                  tags={"pipeline.digest": result.digest, "pipeline.output_path": result.path},
                  step_metrics=steps)
        if datasets:
            self._log_datasets(run_id, result, datasets)
        if origin is None:                      # computed now, or its origin run was deleted
            log_artifacts(self.client, run_id, artifacts or {})   # links, where they can be
            self.client.log_dict(run_id, {"stage": result.stage, "digest": result.digest,
                                          "files": result.files, "metrics": result.metrics,
                                          "info": result.info}, "stage_result.json")
        self.finish(run_id, ok=True)
        return run_id, origin or run_id

    def log_failure(self, stage: str, error: BaseException) -> None:
        status, reason = ending(error)
        run_id = self._child(stage, {ERROR_TAG: reason[:5000]})
        self.client.set_terminated(run_id, status)

    def _log_datasets(self, run_id: str, result: StageResult,
                      datasets: dict[str, Path | DatasetFile]) -> None:
        """Log data files as MLflow dataset references (run inputs), context = their name:
        nothing is loaded, so this costs the same for ten records as for ten million."""
        files = {context: f if isinstance(f, DatasetFile) else DatasetFile(Path(f))
                 for context, f in datasets.items()}
        self.client.log_inputs(run_id, datasets=[
            dataset_input(context, f, content_digest(f.path, result.path, result.digest))
            for context, f in files.items()])

    def log_text(self, run_id: str, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / name).write_text(text, encoding="utf-8")
            self.client.log_artifact(run_id, str(Path(d) / name))
