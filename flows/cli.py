"""The command line of the flows (`python -m flows.pipeline|data|nightly`): how a run ends.

* A data or config error (`DataError`, `ConfigError`) prints one line to stderr --
  `file:line: what is wrong (stage ...)` -- plus a hint where one helps, and exits with 2.
* Any other error is internal: one line, exit 1. `--debug` (or `PIPELINE_DEBUG=1`) prints the
  full traceback instead, and leaves Prefect's own traceback logging as it is.
* Ctrl-C exits with 130; the MLflow run is ended as KILLED (flows/stages.py).
* A config mistake is found before anything starts (`check_config`, called by
  `flows.startup.prepare_cli`): the arguments are parsed and the config loaded before Prefect,
  MLflow or torch is imported, so the one line comes in about a second, not after they and a
  temporary server have started.
* The run's progress (Prefect's and MLflow's logs, warnings, anything a library or a child
  process prints to stderr) goes to stdout, so stderr holds nothing but the error; without
  `--debug`, log records carry no tracebacks.
* The console shows a line per stage, progress where work takes more than a few seconds and
  the summary; `--verbose` (PIPELINE_VERBOSE=1) shows every line (`_Quiet`), library progress
  bars included. Prefect's task-run log and MLflow hold everything either way.

The Prefect flow run and the MLflow run record the failure either way (README "Failure modes").
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from flows import startup
from flows.signals import die_of, signal_in
from tasks.common import ConfigError, DataError, file_lock

EXIT_INTERNAL, EXIT_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def add_common_arguments(ap: argparse.ArgumentParser, *, config_file: bool = True,
                         what: str = "a PipelineConfig field, e.g. train.method=qlora") -> None:
    if config_file:
        ap.add_argument("--config", type=Path, help="JSON/YAML file of PipelineConfig fields "
                                                    "(schema: schemas/pipeline_config.schema."
                                                    "json); relative paths in it are taken "
                                                    "from the current directory")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help=f"override {what}; the value is a literal "
                                              "string unless it parses as JSON (numbers, "
                                              "true/false, null, lists)")
    ap.add_argument("--debug", action="store_true",
                    help="show full tracebacks (also: PIPELINE_DEBUG=1)")
    ap.add_argument("--verbose", action="store_true",
                    help="show every log line on the console (training steps, each task's "
                         "end, library progress bars); also: PIPELINE_VERBOSE=1. The Prefect "
                         "task log and MLflow keep all of it either way")


def _gate_arguments(ap: argparse.ArgumentParser) -> None:
    add_common_arguments(ap)
    ap.add_argument("--gate", dest="gate", action="append", default=[], metavar="KEY=VALUE",
                    help="override a GateConfig field, e.g. metric=bleu_4")


def _pipeline_config(args: argparse.Namespace) -> Any:
    from tasks.config_load import load_config

    return load_config(args.config, args.overrides)


def _data_config(args: argparse.Namespace) -> Any:
    from tasks.config_load import load_config

    return load_config(None, [o if o.startswith("data.") else f"data.{o}"
                              for o in args.overrides]).data


def _nightly_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    from tasks.config_load import load_config, load_model
    from tasks.gate import GateConfig

    return load_config(args.config, args.overrides), load_model(GateConfig, args.gate, "--gate")


@dataclass(frozen=True)
class Command:
    """A flow's command line: its arguments, and how the parsed arguments become the flow's
    config (raising `ConfigError` where they are wrong). Light to import: no Prefect, MLflow
    or torch."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    load: Callable[[argparse.Namespace], Any]

    def parse(self, argv: list[str] | None, description: str | None = None
              ) -> tuple[argparse.Namespace, Callable[[], Any]]:
        """The parsed arguments, and the call that loads the config from them."""
        ap = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_arguments(ap)
        args = ap.parse_args(argv)
        return args, partial(self.load, args)


#: `python -m <module>` of each flow (flows.startup.CLI_FLOWS)
COMMANDS: dict[str, Command] = {
    "flows.pipeline": Command(add_common_arguments, _pipeline_config),
    "flows.data": Command(partial(add_common_arguments, config_file=False,
                                  what="a DataConfig field, e.g. shuffle_seed=7 (or "
                                       "data.shuffle_seed=7)"), _data_config),
    "flows.nightly": Command(_gate_arguments, _nightly_configs),
}


def check_config(module: str, argv: list[str]) -> None:
    """Before anything starts: parse `python -m <module>`'s arguments and load its config; a
    mistake ends the process here, as `run` would end it (one line, exit 2). Help, and any
    error other than a config mistake, are left to the flow's own `main`."""
    if module not in COMMANDS or any(a == "-h" or a.startswith("--h") for a in argv):
        return
    args, load = COMMANDS[module].parse(argv)
    try:
        load()
    except DataError as error:
        if debug_wanted(args):
            traceback.print_exc()
        print(describe(error), file=sys.stderr)
        sys.exit(EXIT_INPUT)
    except Exception:
        return                          # internal: `run` reports it (module docstring)


def debug_wanted(args: argparse.Namespace) -> bool:
    return bool(args.debug) or _env_flag("PIPELINE_DEBUG")


def verbose_wanted(argv: list[str]) -> bool:
    """`--verbose` or PIPELINE_VERBOSE=1: every log line on the console (module docstring)."""
    return "--verbose" in argv or _env_flag("PIPELINE_VERBOSE")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


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


def describe(error: DataError) -> str:
    """The one line (plus a hint line) a data or config error prints."""
    line = str(error) + (f" (stage {error.stage})" if error.stage else "")
    return line + (f"\nhint: {error.hint}" if error.hint else "")


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
    """Without `PREFECT_API_URL` (and no server launched early by flows/startup.py), Prefect
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
    route_logs(debug, verbose=bool(args.verbose) or _env_flag("PIPELINE_VERBOSE"))
    try:
        config = load()
        with _stderr_to_stdout():
            from flows import hygiene       # (imports MLflow)

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
