"""The stack's start/stop bookkeeping and error paths, with real processes (fast; the full stack
with Prefect, MLflow and a browser is tests/ops/test_stack_browser.py)."""

from __future__ import annotations

import socket
import sys
import zoneinfo

import psutil
import pytest
import yaml

from flows.ops.stack import Stack, StackError, free_port, local_timezone, running_api_url
from tasks.runtime.paths import REPO_DIR

pytestmark = pytest.mark.long        # starts and stops service processes


class FakeStack(Stack):
    """The real bookkeeping, with stand-in commands: 'mlflow-server' prints and dies at once,
    the others sleep (with a child process, as the real servers have)."""

    def command(self, service: str) -> list[str]:
        if service == "mlflow-server":
            return [sys.executable, "-c", "print('boom: no database'); raise SystemExit(3)"]
        return [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen("
                "[sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)"]


def test_a_service_that_dies_is_reported_with_its_log_and_stop_leaves_nothing(tmp_path):
    stack = FakeStack(home=tmp_path, prefect_port=free_port(), mlflow_port=free_port())
    with pytest.raises(StackError) as err:
        stack.start(timeout=20)
    msg = str(err.value)
    assert "mlflow-server" in msg or "prefect-server" in msg
    assert str(tmp_path / ".stack") in msg                 # points at the log file

    # a failed start stops what it started: nothing keeps running, not even children
    assert not any(v["running"] for v in stack.status().values())
    assert not [p for p in psutil.process_iter(["cmdline"])
                if "time.sleep(300)" in " ".join(p.info["cmdline"] or [])]
    assert stack.stop() == []
    assert "boom: no database" in stack.log("mlflow-server").read_text()


def test_stale_records_of_a_previous_session_are_forgotten(tmp_path):
    stack = FakeStack(home=tmp_path, prefect_port=free_port(), mlflow_port=free_port())
    dead = {"pid": 999999, "create_time": 1.0, "log": "x"}          # e.g. before a reboot
    stack._save({"processes": dict.fromkeys(["prefect-server", "prefect-worker"], dead)})
    with pytest.raises(StackError, match="mlflow-server: exited"):  # not the stale worker
        stack.start(timeout=20)
    assert stack.stop() == []


def test_start_refuses_a_port_taken_by_someone_else(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = Stack(home=tmp_path, prefect_port=port, mlflow_port=free_port())
        with pytest.raises(StackError, match=f"port {port} .* did not start"):
            stack.start(timeout=5)
    assert stack.status()["prefect-server"]["running"] is False
    assert running_api_url(tmp_path) is None


def test_stack_state_is_recorded_in_the_project(tmp_path):
    stack = Stack(home=tmp_path, prefect_port=14200, mlflow_port=15000)
    stack._save({"processes": {}})
    again = Stack.load(tmp_path)
    assert (again.prefect_port, again.mlflow_port) == (14200, 15000)
    env = again.env()
    assert env["PIPELINE_HOME"] == str(tmp_path)
    assert env["PREFECT_HOME"] == f"{tmp_path}/.prefect"
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:14200/api"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    mlflow = again.command("mlflow-server")
    assert mlflow[mlflow.index("--host") + 1] == "127.0.0.1"
    assert mlflow[mlflow.index("--backend-store-uri") + 1] == env["MLFLOW_TRACKING_URI"]
    assert mlflow[mlflow.index("--artifacts-destination") + 1] == (tmp_path / "mlruns").as_uri()


def test_local_timezone(monkeypatch):
    monkeypatch.setenv("PIPELINE_TIMEZONE", "Asia/Shanghai")
    assert local_timezone() == "Asia/Shanghai"
    monkeypatch.setenv("PIPELINE_TIMEZONE", "Not/AZone")
    monkeypatch.setenv("TZ", ":Europe/Berlin")
    assert local_timezone() == "Europe/Berlin"
    monkeypatch.delenv("PIPELINE_TIMEZONE")
    monkeypatch.delenv("TZ")
    assert local_timezone() in zoneinfo.available_timezones() | {"UTC"}


def test_prefect_yaml_declares_the_three_deployments():
    spec = yaml.safe_load((REPO_DIR / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"full-pipeline", "data-only", "nightly-retrain"}
    nightly = deps["nightly-retrain"]
    assert nightly["schedules"] == [{"cron": "0 2 * * *", "timezone": "{{ $PIPELINE_TIMEZONE }}",
                                     "active": True}]
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert spec["pull"][0]["prefect.deployments.steps.set_working_directory"] == {
        "directory": "{{ $PIPELINE_REPO_DIR }}"}


