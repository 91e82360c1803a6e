"""Setting up a process that runs flows is an explicit call (flows/ops/startup.py): importing the
flows sets none of the project's settings (torch and joblib set their own KMP_* and inductor
variables), starts nothing and loads no torch (a command-line mistake is reported before the
model libraries load, docs/design.md "Paths and values as you meant them"); `prepare()` gives Prefect the
project's settings when it runs before Prefect is imported, and refuses to pretend otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tasks.runtime.paths import REPO_DIR

pytestmark = pytest.mark.long        # fresh interpreters that import the flows


def python(code: str, env: dict[str, str], *, quiet: bool = False) -> dict:
    """Run `code` in a fresh interpreter of this venv; it prints one JSON line. `quiet`: it
    must write nothing to stderr."""
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_DIR, check=True,
                         capture_output=True, text=True, timeout=300)
    assert not quiet or out.stderr == "", out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def bare_env(home) -> dict[str, str]:
    """This environment without any Prefect, MLflow or Hugging Face setting."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "HF_", "DO_NOT_TRACK"))}
    return {**env, "PIPELINE_HOME": str(home)}


def test_importing_the_flows_changes_nothing_and_prepare_then_refuses(tmp_path):
    got = python("""
import json, os, psutil
before = dict(os.environ)
import flows, flows.pipeline, flows.nightly, flows.data, flows.ops.stack, flows.serve
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)
                 and k.startswith(("PREFECT_", "MLFLOW_", "HF_", "PIPELINE_", "DO_NOT_TRACK")))
from flows.ops.startup import prepare
try:
    prepare()
    refused = None
except RuntimeError as e:
    refused = str(e)
import sys
print(json.dumps({"changed": changed, "children": len(psutil.Process().children()),
                  "refused": refused, "loaded": sorted({"torch", "transformers", "nltk",
                                                        "jieba"} & set(sys.modules))}))
""", bare_env(tmp_path))
    assert got["changed"] == [] and got["children"] == 0, got
    assert got["loaded"] == [], got
    assert got["refused"] and "before Prefect is imported" in got["refused"], got
    assert "PREFECT_HOME" in got["refused"]
    assert not (tmp_path / ".prefect").exists(), "an import created the project's state"


def test_prepare_points_prefect_at_the_project_and_keeps_what_is_set(tmp_path):
    env = {**bare_env(tmp_path), "PREFECT_SERVER_ANALYTICS_ENABLED": "true"}
    got = python("""
import json, os
from flows.ops.startup import prepare
prepare()
prepare()                                    # idempotent
from prefect.settings import get_current_settings
s = get_current_settings()
print(json.dumps({"home": str(s.home), "storage": str(s.results.local_storage_path),
                  "analytics": s.server.analytics_enabled,
                  "extra_loggers": os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"],
                  "hf_offline": os.environ["HF_HUB_OFFLINE"]}))
""", env)
    assert got == {"home": str(tmp_path / ".prefect"),
                   "storage": str(tmp_path / ".prefect" / "storage"),
                   "analytics": True,                 # set by the user: kept
                   "extra_loggers": "tasks", "hf_offline": "1"}
    assert (tmp_path / ".prefect").is_dir()


def test_every_flow_command_line_has_the_command_prepare_cli_checks():
    """`prepare_cli` checks the config of each `python -m <flow>` through its `Command` (the
    checks themselves: tests/ops/test_cli_errors.py, for the pipeline, data and nightly flows)."""
    from flows.ops.commands import COMMANDS
    from flows.ops.startup import CLI_FLOWS

    assert set(COMMANDS) == CLI_FLOWS


def test_a_cores_log_line_outside_a_flow_reaches_the_terminal_without_a_prefect_warning(tmp_path):
    # a stage's command line or a notebook: the `tasks.*` loggers are Prefect's extra loggers
    # (a flow's task-run log), and outside a run Prefect warned on every line that it had no run
    got = python("""
import json, logging, warnings
from flows.ops.startup import prepare
prepare()
from prefect.logging.configuration import setup_logging
setup_logging()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    logging.getLogger("tasks.data.ingest").warning("skipped 2 malformed records")
handlers = [type(h).__name__ for h in logging.getLogger("tasks").handlers]
print(json.dumps({"warnings": [str(w.message) for w in caught], "handlers": handlers}))
""", bare_env(tmp_path))
    assert "APILogHandler" in got["handlers"], got      # still sent to a flow's run log
    assert got["warnings"] == [], got


def test_the_temporary_servers_output_goes_to_its_log_which_a_failed_start_quotes(tmp_path):
    """What the command line's Prefect server prints never reaches the terminal (at exit it may
    log a database connection cancelled mid-reset, which once turned a clean run's stderr
    red); when it cannot start, the error quotes the end of its log."""
    code = """
import json, os
from flows.ops.startup import launch_temporary_server, prepare, wait_for_server
prepare()
os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = "sqlite+aiosqlite:////nonexistent/x.db"
launch_temporary_server()
try:
    wait_for_server()
    print(json.dumps({"error": None}))
except RuntimeError as e:
    print(json.dumps({"error": str(e)}))
"""
    error = python(code, bare_env(tmp_path), quiet=True)["error"]
    log = tmp_path / ".prefect" / "temporary-server.log"
    assert error.startswith("the temporary Prefect server (http://127.0.0.1:")
    assert f"exited with code 3 before it answered; its log {log} ends: " in error
    assert "unable to open database file" in error and "Application startup failed" in error
    assert "unable to open database file" in log.read_text(encoding="utf-8")
