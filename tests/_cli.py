"""Running the real command line (`python -m flows.<module>`) in a child process, with its own
project home, as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tasks.runtime.paths import REPO_DIR


def cli_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """The environment of a CLI run on project home `home`: this checkout's code, offline; a
    Prefect API to report to, or none (the run starts its own temporary server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))
           and k not in ("PIPELINE_HOME", "PIPELINE_DEBUG")}
    env.update(PIPELINE_HOME=str(home), PYTHONPATH=str(REPO_DIR), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start(module: str, *args: str, home: Path, cwd: Path | None = None,
          api_url: str | None = None, out: Path | None = None,
          env: dict[str, str] | None = None, own_group: bool = False) -> subprocess.Popen:
    """Start `python -m flows.<module> args...` (`env`: added to its environment); stdout and
    stderr go to files (`out` + .stdout/.stderr, default beside `home`) so a long run cannot
    block on a full pipe. `own_group`: in a process group (session) of its own, as a shell
    starts a command, so that a signal can go to the whole group as a terminal's Ctrl-C does."""
    out = out or home.with_name(home.name + "-cli")
    files = (Path(f"{out}.stdout"), Path(f"{out}.stderr"))
    with open(files[0], "w") as stdout, open(files[1], "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", f"flows.{module}", *args],
                                cwd=cwd or home.parent, env={**cli_env(home, api_url), **(env or {})},
                                stdout=stdout, stderr=stderr, preexec_fn=_as_in_a_terminal,
                                start_new_session=own_group)
    proc.output_files = files
    return proc


def _as_in_a_terminal() -> None:
    """Ctrl-C reaches the run as it does in a terminal, also where this test process was
    started with SIGINT ignored (a shell's background job without job control: `cmd &` in a
    script), which an exec'd child inherits and Python then keeps."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def output(proc: subprocess.Popen) -> tuple[str, str]:
    """(stdout, stderr) so far of a `start`ed process."""
    return tuple(f.read_text(encoding="utf-8") for f in proc.output_files)


def run(module: str, *args: str, home: Path, cwd: Path | None = None,
        api_url: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the CLI to the end; returns the exit code with stdout and stderr."""
    return subprocess.run([sys.executable, "-m", f"flows.{module}", *args],
                          cwd=cwd or home.parent, env=cli_env(home, api_url),
                          capture_output=True, text=True, timeout=timeout)
