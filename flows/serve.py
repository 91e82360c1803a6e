"""Serve the registry's champion with MLflow's own model server, and follow promotions.

    make serve                                    # plant-care-chat@champion on 127.0.0.1:5001
    make serve ARGS="--version 3"                 # a named version, whatever the alias says
    .venv/bin/python -m flows.serve --model my-chat --port 5002

Runs `mlflow models serve -m models:/<model>/<version> --env-manager local` for the version the
alias (default `champion`) points at, and checks the alias every `--poll` seconds: when the
nightly gate promotes another version, the server is restarted on it. A model's first version
is its champion (`make run` crowns it), so `make run` then `make serve` serves at once; while
there is none, one line says what to run, once. The served version is printed
(`serving <model> v<version>`) and each answer's `model` field names the model's folder.
Requests are OpenAI-style chat (README "Where to look"):

    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
      -d '{"messages": [{"role": "user", "content": "绿萝叶子发黄是什么原因？"}], "max_tokens": 64}'
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

from flows.registry import champion_version
from flows.tracking import tracking_uri


@dataclass
class Served:
    version: str
    process: subprocess.Popen


def champion(client, model: str, alias: str) -> str | None:
    """The version `alias` points at, or None."""
    version = champion_version(client, model, alias)
    return None if version is None else str(version.version)


def waiting_line(client, model: str, alias: str) -> str:
    """What to do while `model` has no version under `alias` (one line)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = sorted(int(v.version) for v in client.search_model_versions(
            f"name = '{model}'"))
    except MlflowException:
        versions = []
    if not versions:
        return (f"no version of {model} is registered yet: run `make run` (its first version "
                f"becomes @{alias}); waiting")
    return (f"{model} has versions {', '.join(map(str, versions))} but none is @{alias}: "
            f"`make serve ARGS=\"--version {versions[-1]}\"` serves one now, or the nightly "
            f"flow crowns one; waiting")


def start(model: str, version: str, host: str, port: int) -> Served:
    # the server runs `uvicorn` by name: this interpreter's scripts first on PATH (a venv's)
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(), "HF_HUB_OFFLINE": "1",
           "PATH": path}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{model}/{version}",
         "--env-manager", "local", "--host", host, "--port", str(port), "--workers", "1"],
        env=env, start_new_session=True)       # its own group: stopped with its workers
    print(f"serving {model} v{version} on http://{host}:{port}/invocations", flush=True)
    return Served(version, process)


def stop(served: Served | None) -> None:
    if served is None or served.process.poll() is not None:
        return
    group = os.getpgid(served.process.pid)
    os.killpg(group, signal.SIGTERM)
    try:
        served.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(group, signal.SIGKILL)
        served.process.wait()
    with contextlib.suppress(ProcessLookupError):     # a worker still shutting down
        os.killpg(group, signal.SIGKILL)


def serve(model: str, alias: str, host: str, port: int, poll_s: float,
          version: str | None = None) -> int:
    """Keep the alias's version (or `version`) served until interrupted; 1 if the server
    dies."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri())
    served: Served | None = None
    said = ""
    # SIGTERM asks the loop to stop rather than raising into whatever runs when it lands: a
    # SystemExit raised inside a library's cleanup callback is printed and swallowed, and the
    # process served on (a CI run saw it ignore SIGTERM for 60 s)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        while not stopping.is_set():
            wanted = version or champion(client, model, alias)
            if wanted is None and served is None:
                if (line := waiting_line(client, model, alias)) != said:
                    print(line, flush=True)           # once, not every poll
                    said = line
            elif wanted is not None and (served is None or wanted != served.version):
                if served is not None:
                    print(f"@{alias} moved: {model} v{served.version} -> v{wanted}; "
                          "restarting the server", flush=True)
                stop(served)
                served = start(model, wanted, host, port)
            if served is not None and served.process.poll() is not None:
                print(f"the model server exited with code {served.process.returncode}",
                      file=sys.stderr)
                return 1
            stopping.wait(poll_s)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop(served)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="plant-care-chat", help="registered model name")
    ap.add_argument("--alias", default="champion")
    ap.add_argument("--version", help="serve this version instead of following the alias")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5001)
    ap.add_argument("--poll", type=float, default=30.0, help="seconds between alias checks")
    args = ap.parse_args(argv)
    return serve(args.model, args.alias, args.host, args.port, args.poll, args.version)


if __name__ == "__main__":
    sys.exit(main())
