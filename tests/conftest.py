"""Test isolation: every test session gets its own project home (outputs, MLflow DB, Prefect
home and result cache), never the developer's. This runs before Prefect is imported."""

import os
import tempfile
from pathlib import Path

import pytest

SESSION_HOME = Path(tempfile.mkdtemp(prefix="pipeline-tests-"))
os.environ["PIPELINE_HOME"] = str(SESSION_HOME)
os.environ["PREFECT_HOME"] = str(SESSION_HOME / ".prefect")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(SESSION_HOME / ".prefect" / "storage")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
    os.environ.pop(var, None)

@pytest.fixture
def session_home() -> Path:
    return SESSION_HOME



@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP spinning
    makes them several times slower: one torch thread for the module that asks for it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_sessionfinish(session, exitstatus):
    """Stop Prefect's temporary server while pytest's streams are still open (its own atexit
    hook logs after they are closed, and prints a 'closed file' traceback)."""
    import sys
    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer
        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
