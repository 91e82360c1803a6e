"""The settings of a project home: where a run's state lives, and what every process of the
project runs with (docs/design.md "Where state lives"). Light: no Prefect, MLflow or torch."""

from __future__ import annotations

import os
from pathlib import Path

from tasks.runtime.paths import project_dir


def project_environment(home: Path) -> dict[str, str]:
    """The settings every process of the project at `home` runs with (docs/design.md "Where
    state lives"): Prefect's state inside the project, no telemetry, the stage cores' `tasks.*` log
    records in Prefect's task-run logs (outside a flow -- a stage's CLI, a notebook -- in the
    terminal only, without Prefect's warning that they reach no run), Hugging Face offline (nothing is downloaded at run
    time by accident), and PyTorch's compile caches in the project (.cache/). The stack's
    services get them too (flows/ops/stack.py)."""
    prefect_home = home / ".prefect"
    return {"PREFECT_HOME": str(prefect_home),
            "PREFECT_LOCAL_STORAGE_PATH": str(prefect_home / "storage"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
            # the temporary server of a run can need > 20 s to start on a busy 2-core machine
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks",
            "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            # torch.compile's caches (Inductor's FX graph and AOT autograd caches, Triton's
            # kernels) in the project, kept across runs: a model shape compiles once
            "TORCHINDUCTOR_CACHE_DIR": str(home / ".cache" / "torchinductor"),
            "TRITON_CACHE_DIR": str(home / ".cache" / "triton"),
            "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else the project's sqlite DB (artifacts under mlruns/)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{project_dir() / 'mlflow.db'}"
