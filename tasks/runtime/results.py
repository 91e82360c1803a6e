"""What a stage is called and what it returns (a `StageResult`: small, JSON-able, cached by
Prefect; the files stay on disk). Part of the runtime: no stage's cache key covers it, so adding
a stage re-keys no other stage."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from tasks.runtime.files import verify_outputs
from tasks.runtime.paths import project_dir


class StageName(StrEnum):
    """Every stage's name: its Prefect task, its MLflow child run and `outputs/<name>/`, in
    the order a run computes them."""

    INGEST = "ingest"
    CONVERSATIONS = "conversations"
    VALIDATE = "validate"
    DATA_REPORT = "data_report"
    PREFERENCE_DATA = "preference_data"    # preference tuning: the pairs (read with the data)
    BASE = "base"
    TRAIN = "train"
    MERGE = "merge"
    PREFERENCE = "preference"              # ... the adapter on the merged supervised model,
    MERGE_PREFERENCE = "merge_preference"  # ... folded into it
    QUANTIZE = "quantize"
    QUANTIZE_TORCHAO = "quantize_torchao"
    BENCHMARK = "benchmark"
    GENERATIONS = "generations"
    PREFERENCE_EVAL = "preference_eval"    # ... how often each model prefers the chosen answer
    REPORT = "report"
    EVALUATE_CHAMPION = "evaluate_champion"    # the nightly gate: the champion, as generations
    EVALUATE_CHAMPION_PREFERENCE = "evaluate_champion_preference"


class StepName(StrEnum):
    """The flows' steps that are not cached stages (each is a row of the run's summary and an
    MLflow run of its own)."""

    REGISTER = "register"          # the pipeline: registry versions of what build made
    GATE = "gate"                  # the nightly: champion against challenger


def stage_root(stage: StageName) -> Path:
    """Where a stage keeps its content-addressed outputs: <project>/outputs/<stage>/."""
    return project_dir() / "outputs" / stage


def file_key(name: str) -> str:
    """The key of output file `name` in a result's `files`: its name with dots as underscores
    (`benchmark.json` -> `benchmark_json`), one style for every stage."""
    return name.replace(".", "_")


@dataclass(frozen=True)
class StageResult:
    """The small, picklable record a stage returns (Prefect caches this; files stay on disk).

    `path` is the stage's main output (a file or a directory), `digest` its content digest, which
    is what downstream cache keys see. `files` names the individual artifacts worth browsing,
    `metrics` are numbers for MLflow, `summary` is markdown a person reads (the benchmark
    table, the report), `history` the step metrics of a training (one dict per logged step:
    its `step` and values, e.g. `loss`), `device` where a model stage computed, `dtype` the
    dtype a model output loads in (merge: its weights'; int4: its compute dtype), and `info` any
    other JSON-able detail a later stage reads. `result_id` is minted when the stage really
    executes, so a cache hit can be traced back to the run that computed it."""

    stage: StageName
    path: str
    digest: str
    files: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    device: str | None = None
    dtype: str | None = None
    result_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage", StageName(self.stage))   # a typo fails here, loudly

    def file(self, name: str) -> Path:
        return Path(self.files[name])

    def problem(self) -> str | None:
        """None if the outputs this result points at are there as published (docs/design.md
        "Failure modes"), else what is wrong with them."""
        return verify_outputs([self.path, *self.files.values()])
