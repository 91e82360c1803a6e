"""The command line of the flows (`python -m flows.pipeline|data|nightly`): how a run ends.

* A data or config error (`DataError`, `ConfigError`) prints one line to stderr --
  `file:line: what is wrong (stage ...)` -- plus a hint where one helps, and exits with 2.
* Any other error is internal: one line, exit 1. `--debug` (or `PIPELINE_DEBUG=1`) prints the
  full traceback instead, and leaves Prefect's own traceback logging as it is.
* Ctrl-C exits with 130; the MLflow run is ended as KILLED (flows/running.py).
* A config mistake is found before anything starts (`check_config`, called by
  `flows.ops.startup.prepare_cli`): the arguments are parsed and the config loaded before Prefect,
  MLflow or torch is imported, so the one line comes in about a second, not after they and a
  temporary server have started.
* The run's progress (Prefect's and MLflow's logs, warnings, anything a library or a child
  process prints to stderr) goes to stdout, so stderr holds nothing but the error; without
  `--debug`, log records carry no tracebacks.
* The console shows a line per stage, progress where work takes more than a few seconds and
  the summary; `--verbose` (PIPELINE_VERBOSE=1) shows every line (`_Quiet`), library progress
  bars included. Prefect's task-run log and MLflow hold everything either way.

The Prefect flow run and the MLflow run record the failure either way (docs/design.md "Failure modes").
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import urllib.request
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

from flows.ops import startup
from flows.ops.commands import EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, \
    debug_wanted, describe, env_flag
from flows.ops.signals import die_of, signal_in
from tasks.runtime.errors import ConfigError, DataError
from tasks.runtime.files import file_lock

class _Quiet(logging.Filter):
    """The console, not the logs: a run prints one line per stage, progress where work takes
    more than a few seconds, and the summary. What it leaves out of the console (still in
    Prefect's task-run log and MLflow): each training step's line (the train stage prints its
    progress instead) and Prefect's "Task run ... Finished in state Completed()" beside our own
    line per stage."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "tasks.train" and str(record.msg).startswith("step "):
            return False
        return not (record.name == "prefect.task_runs" and record.levelno == logging.INFO
                    and str(record.msg).startswith("Finished in state Completed"))


class _NoTracebacks(logging.Formatter):
    """A handler's formatter, minus the traceback (the message line stays). Formats a copy of
    the record: other handlers (Prefect's API log) still get the traceback."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        bare = logging.makeLogRecord(record.__dict__)
        bare.exc_info, bare.exc_text, bare.stack_info = None, None, None
        return self.inner.format(bare)


def route_logs(debug: bool, verbose: bool = True) -> None:
    """Send the console logs of Prefect and MLflow (and Python warnings) to stdout, without
    tracebacks unless `debug`, and without the lines `_Quiet` leaves out unless `verbose`:
    stderr is left to the error that ends the run."""
    from prefect.logging.handlers import PrefectConsoleHandler

    logging.captureWarnings(True)
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in
                                       list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.setStream(sys.stdout)
                handler.console.file = sys.stdout
                if not verbose and not any(isinstance(f, _Quiet) for f in handler.filters):
                    handler.addFilter(_Quiet())
            elif isinstance(handler, logging.StreamHandler) and \
                    logger.name.split(".")[0] == "mlflow":
                handler.setStream(sys.stdout)
            else:
                continue
            if not debug:
                handler.setFormatter(_NoTracebacks(handler.formatter))


def start_api_server() -> None:
    """Without `PREFECT_API_URL` (and no server launched early by flows/ops/startup.py), Prefect
    runs a temporary API server on the project's database for this process. Two runs started together on a new project would both create
    that database: start it here, under a lock, before the flow does. With it, check that
    the server answers (else every step would retry and fail with a long traceback)."""
    from prefect.client.orchestration import get_client

    url = os.environ.get("PREFECT_API_URL")
    if startup.temporary_server() is not None:       # launched early and waited for (ready)
        problem = None
    else:
        with file_lock("prefect-db") if not url else nullcontext():
            with get_client(sync_client=True) as client:
                problem = client.api_healthcheck()
    if problem is not None and url:
        raise ConfigError(f"PREFECT_API_URL={url}", f"the Prefect API does not answer "
                          f"({type(problem).__name__})", hint="start it (make stack), or "
                          "unset PREFECT_API_URL to run on a temporary server")
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    if tracking.startswith(("http://", "https://")) and not _answers(f"{tracking}/health"):
        raise ConfigError(f"MLFLOW_TRACKING_URI={tracking}", "the MLflow server does not "
                          "answer", hint="start it (make stack), or unset MLFLOW_TRACKING_URI "
                          "to track into the project's mlflow.db")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


@contextmanager
def _stderr_to_stdout() -> Iterator[None]:
    """While the flow runs, whatever writes to stderr -- C extensions, child processes such as
    the temporary Prefect server, libraries that print -- writes to stdout instead (file
    descriptor 2 points at 1); stderr is left to the error that ends the run."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(1, 2)
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def run(load: Callable[[], Any], flow: Callable[[Any], Any], args: argparse.Namespace) -> int:
    """`flow(load())` from the command line (the config is loaded and checked before any
    server starts); return the exit code (see the module docstring)."""
    debug = debug_wanted(args)
    route_logs(debug, verbose=bool(args.verbose) or env_flag("PIPELINE_VERBOSE"))
    try:
        config = load()
        with _stderr_to_stdout():
            from flows.ops import hygiene

            hygiene.start_watchdog()        # before Prefect's own temporary server starts
            startup.ready()
            start_api_server()
            flow(config)
    except DataError as error:
        if debug:
            traceback.print_exc()
        print(describe(error), file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as error:
        if (killer := signal_in(error)) is not None:      # it surfaced as another error
            if isinstance(killer, KeyboardInterrupt):
                return _interrupted()
            die_of(killer)
        if debug:
            traceback.print_exc()
            return EXIT_INTERNAL
        first = (str(error).strip().splitlines() or [""])[0][:500]
        print(f"internal error: {type(error).__name__}: {first}\n"
              "hint: run again with --debug (or PIPELINE_DEBUG=1) for the full traceback",
              file=sys.stderr)
        return EXIT_INTERNAL
    return 0


def _interrupted() -> int:
    print("interrupted (Ctrl-C): the MLflow run is marked KILLED; run again to resume "
          "from the cache", file=sys.stderr)
    return EXIT_INTERRUPTED
