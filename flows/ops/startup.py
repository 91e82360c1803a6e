"""Setting up a process that runs flows (`prepare`), and a fast start for
`python -m flows.data|pipeline|nightly` (`prepare_cli`): Prefect's server boots while the rest of
the run starts.

Prefect reads its settings once, when it is imported, so both must be called before that:

    from flows.ops.startup import prepare      # a script or notebook that runs a flow
    prepare()
    from flows.pipeline import pipeline

A flow needs a Prefect API. While the local stack is up (`make stack`), `prepare_cli` points
`PREFECT_API_URL` at its server. Otherwise Prefect starts a temporary server at the
flow's first API call, and everything happens one after the other: import Prefect and MLflow,
import Prefect's server code into this process (~3 s on a 2-core machine), start the server in a
subprocess and wait for it, open the MLflow store, and only then the first stage.

Here, for a command-line run, the same server command Prefect runs
(`prefect.server.api.server.SubprocessASGIServer`, Prefect 3.8: uvicorn with the server's app
factory, UI and background services off) is launched by `prepare_cli`, before Prefect is imported,
so it boots while this process imports the rest and opens the MLflow store
(`ready`). The temporary server's start is then the only fixed cost a run waits for. The server
is stopped at exit and, on Linux, is signalled when this process dies in any way (SIGKILL
included: `PR_SET_PDEATHSIG`), so it never outlives the run. Its own output goes to
`$PREFECT_HOME/temporary-server.log`, not the terminal: what it logs while it is stopped (a
database connection cancelled mid-reset) is nothing a user can act on, and an error that stops
it from starting is quoted from there.

Python's cyclic garbage collector is a fixed cost too, with the ~2,500 modules Prefect and MLflow
bring: it runs over and over while they are imported (~0.7 s here) and walks every object once
more when the interpreter exits (~1.3 s). A command-line run imports with the collector off,
then freezes what it imported (`gc.freeze`: long-lived, never collected) and turns it back on for
the flow, and freezes everything at exit, where the operating system frees the memory anyway.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.ops.home import project_environment

#: `python -m <one of these>` runs a flow, and so needs an API server from the start
CLI_FLOWS = frozenset({"flows.data", "flows.pipeline", "flows.nightly"})


def prepare(*, seed: bool = True) -> None:
    """Point this process at the project (`PIPELINE_HOME`, default: the repository) with
    `project_environment`, except where the environment already says otherwise, and (`seed`)
    give a new project its Prefect database from the template (`seed_prefect`). Idempotent.
    Raises if Prefect was imported before and a Prefect setting would still change."""
    from tasks.runtime.paths import project_dir

    home = project_dir()
    missing = {k: v for k, v in project_environment(home).items() if k not in os.environ}
    if "prefect" in sys.modules and any(k.startswith("PREFECT_") for k in missing):
        raise RuntimeError("flows.ops.startup.prepare() must run before Prefect is imported (it "
                           f"reads {', '.join(sorted(missing))} once, at import)")
    os.environ.update(missing)
    with contextlib.suppress(OSError):     # a new PIPELINE_HOME: Prefect makes one level only
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    if seed:
        seed_prefect()


def seed_prefect() -> None:
    """A new project's Prefect database, copied from the template (flows/ops/databases.py), where
    this process will start Prefect's server on it: no API URL and no database URL are set."""
    if not {"PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL"} & set(os.environ):
        from flows.ops.databases import seed

        seed("prefect", Path(os.environ["PREFECT_HOME"]) / "prefect.db")


def prepare_cli() -> None:
    """For `python -m flows.<flow>`, first thing, before Prefect is imported: `prepare()`, the
    collector off while the run imports (module docstring), and an API server: the stack's
    while `make stack` is up, else a temporary one launched now (unless `PREFECT_API_URL` or
    Prefect's own settings files name one). `--help` only prepares. A config mistake ends the
    process before any of it (`flows.ops.commands.check_config`)."""
    prepare(seed=False)                  # seeded where the server is launched, if it is
    if (module := cli_flow()) is None:
        return
    from flows.ops.commands import check_config, verbose_wanted

    check_config(module, sys.argv[1:])
    if not verbose_wanted(sys.argv[1:]):       # transformers' bars for loads of milliseconds
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    begin_cli_run()
    if "PREFECT_API_URL" in os.environ:
        return
    from flows.ops.stack import running_api_url

    if url := running_api_url():
        os.environ["PREFECT_API_URL"] = url
    elif not api_url_configured():
        os.environ["PREFECT_API_URL"] = launch_temporary_server()


@dataclass
class TemporaryServer:
    process: subprocess.Popen
    url: str                          # the API URL (".../api")
    log: Path                         # where its stdout and stderr go
    launched: float                   # time.perf_counter() at launch
    ready_seconds: float | None = None    # launch -> healthy
    waited_seconds: float = 0.0           # how long the run was blocked waiting for it
    creating_database: Any = None         # the lock held while it creates a new database


_server: TemporaryServer | None = None


def cli_flow() -> str | None:
    """The flow module this process runs as `python -m <module>`, if it is one of ours."""
    argv = getattr(sys, "orig_argv", [])
    at = argv.index("-m") if "-m" in argv else -1
    module = argv[at + 1] if 0 <= at < len(argv) - 1 else None
    if module in CLI_FLOWS and not {"-h", "--help"} & set(argv):
        return module
    return None


def api_url_configured() -> bool:
    """Could Prefect's own settings files name an API server: a profile, `.env`, `prefect.toml`
    or `pyproject.toml` `[tool.prefect]` (or move the profiles elsewhere)? Then Prefect keeps
    the choice and no server is launched early. Read as text and TOML, without Prefect."""
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml"))
    for path in (profiles, Path(".env")):
        if path.is_file() and "PREFECT_API_URL" in path.read_text(errors="replace"):
            return True
    for path, keys in ((Path("prefect.toml"), ()), (Path("pyproject.toml"), ("tool", "prefect"))):
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in keys:
            table = table.get(key, {})
        if table.get("profiles_path") or table.get("api", {}).get("url"):
            return True
    return False


def process_seconds() -> float:
    """How long this process has been running (Linux: to a clock tick, from /proc)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])       # field 22, starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError):
        import psutil

        return time.time() - psutil.Process().create_time()


def begin_cli_run() -> None:
    """For `python -m flows.<flow>`, before Prefect is imported: the collector off while the
    run imports, and no collection at exit (module docstring)."""
    gc.disable()
    atexit.register(gc.freeze)          # registered first, so it runs after every other hook


def _die_with_parent() -> None:                      # runs in the child, before exec
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # 1 = PR_SET_PDEATHSIG


def launch_temporary_server() -> str:
    """Start Prefect's server for this run in a subprocess (not waiting for it); return its API
    URL, for `PREFECT_API_URL`. Call before Prefect is imported."""
    global _server
    creating = None
    seed_prefect()
    if not (Path(os.environ["PREFECT_HOME"]) / "prefect.db").exists():
        # a new project with no template to copy (flows/ops/databases.py): the server creates the
        # database. Two first runs started together would both create it, so the second waits
        # here until the first's server answers.
        from tasks.runtime.files import file_lock

        creating = file_lock("prefect-db")
        creating.acquire()
    from flows.ops.stack import free_port

    port = free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    log = Path(os.environ["PREFECT_HOME"]) / "temporary-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:           # appended to: runs may share a home
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            stdout=output, stderr=subprocess.STDOUT,
            # a session of its own: a Ctrl-C in the terminal (SIGINT to the whole foreground
            # process group) or a SIGTERM to the run's group must not stop the server while the
            # run still reports its end to it; the run stops it at exit (atexit), its death
            # stops it (PR_SET_PDEATHSIG)
            start_new_session=True)
    _server = TemporaryServer(process, f"http://127.0.0.1:{port}/api", log,
                              time.perf_counter(), creating_database=creating)
    atexit.register(stop_temporary_server)
    return _server.url


def temporary_server() -> TemporaryServer | None:
    """The server `launch_temporary_server` started in this process, if any."""
    return _server


def wait_for_server() -> None:
    """Block until the launched server answers (no-op without one); fail with its exit code
    if it died, or after `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`."""
    if _server is None or _server.ready_seconds is not None:
        return
    start, said = time.perf_counter(), _server.launched
    limit = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
    while True:
        if time.perf_counter() - said >= 10:              # never silent for long (README)
            said = time.perf_counter()
            print(f"waiting for the temporary Prefect server at {_server.url} "
                  f"({said - _server.launched:.0f} s since it was started)", flush=True)
        if (code := _server.process.poll()) is not None:
            raise RuntimeError(f"the temporary Prefect server ({_server.url}) exited with "
                               f"code {code} before it answered; {_last_lines(_server.log)}")
        try:
            with urllib.request.urlopen(f"{_server.url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except (OSError, urllib.error.URLError):
            pass
        if time.perf_counter() - start > limit:
            raise RuntimeError(f"the temporary Prefect server ({_server.url}) did not answer "
                               f"within {limit:.0f} s; {_last_lines(_server.log)}")
        time.sleep(0.05)
    now = time.perf_counter()
    _server.ready_seconds, _server.waited_seconds = now - _server.launched, now - start
    if _server.creating_database is not None:          # the database exists now
        _server.creating_database.release()
        _server.creating_database = None


def _last_lines(log: Path, n: int = 5) -> str:
    """The end of the server's log, for an error that says why it did not start."""
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace")
                 .splitlines() if line.strip()][-n:]
    except OSError:
        lines = []
    return f"its log {log} ends: " + " | ".join(lines) if lines else f"its log {log} is empty"


def ready() -> None:
    """Called by a CLI just before it runs its flow: open the MLflow store (creating it on a
    project's first run) while the server boots, wait for the server, and turn the garbage
    collector back on with everything imported so far frozen."""
    if _server is not None:
        from mlflow import MlflowClient

        from flows.ops.databases import seed_mlflow
        from flows.ops.home import tracking_uri
        from tasks.runtime.files import file_lock

        with file_lock("mlflow-db"):             # two first runs must not both create it
            seed_mlflow(tracking_uri())          # a new home: from the template
            MlflowClient(tracking_uri())         # opens (or creates) the store, kept by MLflow
        wait_for_server()
    gc.freeze()
    gc.enable()


def stop_temporary_server() -> None:
    global _server
    if _server is None:
        return
    _server.process.terminate()
    try:
        _server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _server.process.kill()
        _server.process.wait()
    _server = None
