"""Where things are: the repository, its data and schemas, and the project home where a run's
state lives (docs/design.md "Where state lives"). Part of the runtime: no stage's cache key covers it."""

from __future__ import annotations

import os
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_DIR / "data"
SCHEMA_DIR = REPO_DIR / "schemas"


def project_dir() -> Path:
    """Where pipeline state lives (outputs/, mlflow.db, mlruns/, .prefect/).

    Defaults to the repository; `PIPELINE_HOME` moves all of it (tests use a temp dir)."""
    return Path(os.environ.get("PIPELINE_HOME", REPO_DIR)).resolve()


def is_local_model_path(raw: str) -> bool:
    """Whether a `base.path` names a local folder (it exists, or is spelled like a path) rather
    than a hub id such as "Qwen/Qwen2.5-0.5B-Instruct"."""
    raw = raw.strip()
    return (Path(raw).expanduser().exists() or Path(raw).is_absolute()
            or raw.startswith((".", "~")) or raw.count("/") > 1)
