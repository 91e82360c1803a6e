"""Crash hygiene at the start of every flow run (docs/design.md "Failure modes"): nothing a killed run
left behind is trusted or left running.

* staging directories under outputs/ whose owning process is gone are removed
  (`tasks.runtime.files.sweep_leftovers`);
* MLflow runs still RUNNING whose process is gone (pid, start time and host are tagged on every
  run we start) are ended as KILLED, and their Prefect flow run, if still Running, as Crashed;
* a watchdog process (flows/ops/watchdog.py) stops the processes a flow started -- Prefect's
  temporary API server among them -- if the flow itself is killed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from flows.ops.signals import signal_in
from tasks.runtime.files import owner_gone, owner_tag, sweep_leftovers

log = logging.getLogger(__name__)
OWNER_TAG = "pipeline.owner"
_watchdog: subprocess.Popen | None = None


def owner_tags() -> dict[str, str]:
    """Tags that say which process a run belongs to (`pipeline.owner` is what is checked)."""
    return {OWNER_TAG: owner_tag(), "pipeline.pid": str(os.getpid()),
            "pipeline.host": socket.gethostname()}


def ending(error: BaseException) -> tuple[str, str]:
    """(MLflow run status, reason) for a run an exception ended: a signal or Ctrl-C (also one
    that surfaced as another exception, `signal_in`) is KILLED, anything else FAILED."""
    error = signal_in(error) or error
    if isinstance(error, Exception):
        stage = getattr(error, "stage", None)
        return "FAILED", f"{type(error).__name__}: {error}" + (f" [stage {stage}]" if stage
                                                                else "")
    if isinstance(error, KeyboardInterrupt):
        return "KILLED", "interrupted (SIGINT, Ctrl-C)"
    if isinstance(sig := getattr(error, "signal", None), int):
        return "KILLED", f"terminated by {signal.Signals(sig).name}"
    return "KILLED", f"stopped by {type(error).__name__} {error}".strip()


def end_orphaned_runs(client: MlflowClient) -> list[str]:
    """End the RUNNING runs (any experiment) whose process is gone as KILLED; returns their ids."""
    ended = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return ended
    running = client.search_runs(experiments, f"attributes.status = 'RUNNING' and "
                                              f"tags.`{OWNER_TAG}` != ''", max_results=1000)
    for run in running:
        owner = run.data.tags.get(OWNER_TAG, "")
        if not owner_gone(owner):
            continue
        pid = run.data.tags.get("pipeline.pid", "?")
        reason = (f"killed: its process (pid {pid} on {run.data.tags.get('pipeline.host')}) "
                  "ended without closing the run; found by a later run")
        client.set_tag(run.info.run_id, "pipeline.error", reason)
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
        if flow_run_id := run.data.tags.get("prefect.flow_run_id"):
            _crash_flow_run(flow_run_id, reason)
    return ended


def _crash_flow_run(flow_run_id: str, reason: str) -> None:
    """Mark a Prefect flow run that is still Running as Crashed (best effort)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_running():
                client.set_flow_run_state(flow_run_id, Crashed(message=reason), force=True)
    except Exception as e:          # an unknown id, another server: the MLflow side is done
        log.debug("could not mark flow run %s crashed: %s", flow_run_id, e)


def sweep(client: MlflowClient) -> None:
    """What a killed run left: half-written outputs, runs stuck in RUNNING."""
    for path in sweep_leftovers():
        log.warning("removed %s: left half-written by a process that is gone", path)
    for run_id in end_orphaned_runs(client):
        log.warning("MLflow run %s was RUNNING but its process is gone: marked KILLED", run_id)


def start_watchdog() -> None:
    """Start flows/ops/watchdog.py for this process, once: if this process is killed, it stops
    whatever this process started (Prefect's temporary server included)."""
    global _watchdog
    if _watchdog is not None and _watchdog.poll() is None:
        return
    script = Path(__file__).with_name("watchdog.py")
    _watchdog = subprocess.Popen([sys.executable, str(script), str(os.getpid())],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                 start_new_session=True, close_fds=True)
