"""The local stack, one command each: Prefect server + UI, a process worker, MLflow server + UI.

    python -m flows.ops.stack start      # returns once http://127.0.0.1:4200 and :5000 both answer
    python -m flows.ops.stack deploy     # prefect.yaml -> the three deployments (idempotent)
    python -m flows.ops.stack status
    python -m flows.ops.stack stop       # by PID, whole process trees (flow runs included)

Everything binds 127.0.0.1 and every file stays in the project (`PIPELINE_HOME`, default the
repo): `.stack/` (pids, ports, logs), `.prefect/` (Prefect's DB and result cache), `mlflow.db` and
`mlruns/` -- the same tracking DB and artifact folder the flows write to, so the MLflow UI shows
exactly what the pipeline logged. The worker runs each flow run as a subprocess with its own
environment (PIPELINE_HOME, MLFLOW_TRACKING_URI, PREFECT_API_URL), so a run started from the
Prefect UI behaves like `make run`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zoneinfo
from dataclasses import dataclass
from pathlib import Path

import psutil

from flows.ops.databases import seed, seed_mlflow
from tasks.runtime.paths import REPO_DIR, project_dir

HOST = "127.0.0.1"
POOL = "local-process"
SERVICES = ("prefect-server", "mlflow-server", "prefect-worker")


#: Prefect's worker takes a first SIGTERM as "stop taking flow runs and wait for those running"
#: (they are stopped here too), a second as "now" (it SIGKILLs itself; prefect.utilities.
#: processutils.setup_signal_handlers_worker). After it has run flow runs, that wait was seen
#: to last past 20 s with none left to wait for; the second SIGTERM follows after this grace.
WORKER_GRACE_S = 5.0


class StackError(RuntimeError):
    """The stack could not be started/used; the message names the log to read."""


def local_timezone() -> str:
    """IANA name of this machine's zone ($PIPELINE_TIMEZONE, $TZ, /etc/localtime, /etc/timezone;
    "UTC" if none is a valid name): the nightly cron runs at 02:00 *local* time."""
    names = zoneinfo.available_timezones()
    candidates = [os.environ.get("PIPELINE_TIMEZONE", ""), os.environ.get("TZ", "").lstrip(":")]
    link = os.path.realpath("/etc/localtime")
    if "zoneinfo/" in link:
        candidates.append(link.split("zoneinfo/", 1)[1])
    if os.path.isfile("/etc/timezone"):
        candidates.append(Path("/etc/timezone").read_text().strip())
    return next((c for c in candidates if c in names), "UTC")


@dataclass
class Stack:
    home: Path
    prefect_port: int = 4200
    mlflow_port: int = 5000
    pool: str = POOL

    # -- where things are ---------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        return self.home / ".stack"

    @property
    def prefect_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}"

    @property
    def api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.home / 'mlflow.db'}"

    def log(self, service: str) -> Path:
        return self.dir / f"{service}.log"

    @classmethod
    def load(cls, home: Path | None = None) -> "Stack":
        """The stack recorded in <home>/.stack/stack.json (ports of the last start)."""
        home = Path(home or project_dir()).resolve()
        saved = home / ".stack" / "stack.json"
        fields = json.loads(saved.read_text())["config"] if saved.is_file() else {}
        return cls(home=home, **{k: v for k, v in fields.items() if k != "home"})

    def env(self) -> dict[str, str]:
        """Environment of every stack process (and, through the worker, of every flow run)."""
        from flows.ops.home import project_environment

        home = str(self.home)
        return {**os.environ, **project_environment(self.home), "PIPELINE_HOME": home,
                "PREFECT_API_URL": self.api_url, "PREFECT_UI_API_URL": self.api_url,
                "PREFECT_SERVER_API_HOST": HOST, "PREFECT_SERVER_API_PORT": str(self.prefect_port),
                "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
                "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "5"),
                "MLFLOW_TRACKING_URI": self.tracking_uri,
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "PYTHONUNBUFFERED": "1"}

    def command(self, service: str) -> list[str]:
        py = sys.executable
        if service == "prefect-server":
            return [py, "-m", "prefect", "server", "start", "--host", HOST,
                    "--port", str(self.prefect_port), "--analytics-off", "--no-background"]
        if service == "prefect-worker":
            return [py, "-m", "prefect", "worker", "start", "--pool", self.pool, "--type",
                    "process", "--name", f"{self.pool}-worker", "--install-policy", "never"]
        if service == "mlflow-server":
            return [py, "-m", "mlflow", "server", "--host", HOST, "--port", str(self.mlflow_port),
                    "--workers", "1", "--backend-store-uri", self.tracking_uri,
                    "--artifacts-destination", (self.home / "mlruns").as_uri()]
        raise KeyError(service)

    # -- process bookkeeping ------------------------------------------------------------------
    def _state(self) -> dict:
        path = self.dir / "stack.json"
        return json.loads(path.read_text()) if path.is_file() else {"processes": {}}

    def _save(self, state: dict) -> None:
        state["config"] = {"prefect_port": self.prefect_port, "mlflow_port": self.mlflow_port,
                           "pool": self.pool}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "stack.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.dir / "stack.json")

    def process(self, service: str) -> psutil.Process | None:
        """The live process we started for `service` (PID *and* start time must match, so a
        recycled PID is never mistaken for ours)."""
        rec = self._state()["processes"].get(service)
        if not rec:
            return None
        try:
            proc = psutil.Process(rec["pid"])
            if abs(proc.create_time() - rec["create_time"]) < 1 and proc.status() != \
                    psutil.STATUS_ZOMBIE:
                return proc
        except psutil.Error:
            pass
        return None

    def _spawn(self, service: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log(service), "ab") as log:
            log.write(f"\n==== {time.strftime('%F %T')} start: {self.command(service)}\n".encode())
            log.flush()
            proc = subprocess.Popen(self.command(service), cwd=REPO_DIR, env=self.env(),
                                    stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        state = self._state()
        state["processes"][service] = {"pid": proc.pid,
                                       "create_time": psutil.Process(proc.pid).create_time(),
                                       "log": str(self.log(service))}
        self._save(state)

    # -- health -------------------------------------------------------------------------------
    def _fail(self, service: str, why: str) -> StackError:
        tail = ""
        if self.log(service).is_file():
            lines = self.log(service).read_text(errors="replace").splitlines()[-15:]
            tail = "\n  | ".join([""] + lines)
        return StackError(f"{service}: {why}. Log: {self.log(service)}{tail}")

    def _wait(self, service: str, check, what: str, deadline: float) -> None:
        while True:
            for started in self._state()["processes"]:      # any of them died: say which
                if self.process(started) is None:
                    raise self._fail(started, f"exited while waiting for {what}")
            try:
                if check():
                    return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise self._fail(service, f"no answer from {what} within the timeout")
            time.sleep(0.5)

    def health(self) -> dict[str, bool]:
        return {"prefect_api": _get(f"{self.api_url}/health") == "true",
                "prefect_ui": "<html" in _get(f"{self.prefect_url}/").lower(),
                "mlflow_api": _get(f"{self.mlflow_url}/health") == "OK",
                "mlflow_ui": "<html" in _get(f"{self.mlflow_url}/").lower(),
                "worker": self.worker_online()}

    def worker_online(self) -> bool:
        body = json.dumps({"workers": {}}).encode()
        req = urllib.request.Request(f"{self.api_url}/work_pools/{self.pool}/workers/filter",
                                     data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                workers = json.loads(r.read())
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return any(w.get("status") == "ONLINE" for w in workers)

    # -- commands -----------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> dict[str, str]:
        """Start what is not running yet; return when both UIs and the worker answer. If that
        fails, what this call started is stopped again and the error names the log to read."""
        before = {s for s in SERVICES if self.process(s) is not None}
        try:
            return self._start(time.monotonic() + timeout)
        except BaseException:
            self.stop(services=[s for s in SERVICES if s not in before])
            raise

    def _start(self, deadline: float) -> dict[str, str]:
        state = self._state()                    # forget processes that are gone (a reboot)
        state["processes"] = {s: r for s, r in state["processes"].items() if self.process(s)}
        self._save(state)
        env = self.env()                    # a new home: its empty databases from templates
        if "PREFECT_API_DATABASE_CONNECTION_URL" not in env:
            seed("prefect", Path(env["PREFECT_HOME"]) / "prefect.db")
        seed_mlflow(self.tracking_uri)
        for service, port in (("prefect-server", self.prefect_port),
                              ("mlflow-server", self.mlflow_port)):
            if self.process(service) is None:
                if _port_busy(port):
                    raise StackError(f"{service}: port {port} on {HOST} is taken by a process "
                                     "this stack did not start (another stack? `python -m "
                                     "flows.ops.stack status`), or choose another port")
                self._spawn(service)
        self._wait("prefect-server", lambda: _get(f"{self.api_url}/health") == "true",
                   f"{self.api_url}/health", deadline)
        if self.process("prefect-worker") is None:
            self._spawn("prefect-worker")
        self._wait("prefect-server", lambda: "<html" in _get(self.prefect_url + "/").lower(),
                   f"the Prefect UI at {self.prefect_url}", deadline)
        self._wait("mlflow-server", lambda: _get(f"{self.mlflow_url}/health") == "OK" and
                   "<html" in _get(self.mlflow_url + "/").lower(),
                   f"the MLflow UI at {self.mlflow_url}", deadline)
        self._wait("prefect-worker", self.worker_online,
                   f"the worker of work pool {self.pool!r}", deadline)
        return {"prefect": self.prefect_url, "mlflow": self.mlflow_url}

    def stop(self, timeout: float = 20.0, services: list[str] | None = None) -> list[str]:
        """Stop every process we started, children included (flow runs the worker spawned in
        their own sessions too); return the services that were running."""
        stopped = []
        state = self._state()
        for service in ("prefect-worker", "prefect-server", "mlflow-server"):
            if services is not None and service not in services:
                continue
            proc = self.process(service)
            state["processes"].pop(service, None)
            if proc is None:
                continue
            tree = [proc] + proc.children(recursive=True)
            for p in tree:
                _signal(p, signal.SIGTERM)
            if service == "prefect-worker":
                _, alive = psutil.wait_procs(tree, timeout=WORKER_GRACE_S)
                if proc in alive:
                    _signal(proc, signal.SIGTERM)         # Prefect's second SIGTERM: now
            _, alive = psutil.wait_procs(tree, timeout=timeout)
            for p in alive + [c for p in alive for c in _children(p)]:
                _signal(p, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=5)
            stopped.append(service)
        self._save(state)
        return stopped

    def status(self) -> dict[str, dict]:
        out = {}
        for service in SERVICES:
            proc = self.process(service)
            out[service] = {"running": proc is not None, "pid": proc.pid if proc else None,
                            "log": str(self.log(service))}
        return out

    def deploy(self, prefect_file: Path = REPO_DIR / "prefect.yaml") -> str:
        """`prefect deploy --all` of `prefect_file` against this stack (create or update by
        name: running it again changes nothing but what you edited)."""
        if _get(f"{self.api_url}/health") != "true":
            raise StackError(f"no Prefect server at {self.api_url}: run `make stack` first")
        env = {**self.env(), "PIPELINE_REPO_DIR": str(REPO_DIR),
               "PIPELINE_WORK_POOL": self.pool, "PIPELINE_TIMEZONE": local_timezone()}
        if not _get(f"{self.api_url}/work_pools/{self.pool}"):     # the worker makes it
            subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", self.pool,
                            "--type", "process"], env=env, capture_output=True, check=True)
        res = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
                              "--prefect-file", str(prefect_file)],
                             cwd=REPO_DIR, env=env, capture_output=True, text=True)
        out = res.stdout + res.stderr
        if res.returncode:
            raise StackError(f"prefect deploy failed (exit {res.returncode}):\n{out}")
        return out


def running_api_url(home: Path | None = None) -> str | None:
    """The Prefect API of this project's stack if it is up, else None. Shell runs (`make run`)
    should report there -- they then show in its UI -- rather than start a temporary Prefect
    server on the same database (.prefect/prefect.db) next to the stack's."""
    stack = Stack.load(home)
    if stack.process("prefect-server") is None:
        return None
    return stack.api_url if _get(f"{stack.api_url}/health", timeout=2) == "true" else None


def _get(url: str, timeout: float = 5.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode("utf-8", errors="replace").strip()
    except (OSError, urllib.error.URLError, ValueError):
        return ""


def free_port() -> int:
    """A TCP port on HOST that nothing listens on now (the operating system picks it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port)) == 0


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["start", "stop", "status", "deploy"])
    ap.add_argument("--prefect-port", type=int, help="default 4200 (or the last start's)")
    ap.add_argument("--mlflow-port", type=int, help="default 5000 (or the last start's)")
    ap.add_argument("--timeout", type=float, default=180.0, help="start: seconds to wait")
    args = ap.parse_args(argv)
    stack = Stack.load()
    if args.prefect_port or args.mlflow_port:
        if args.command == "start" and any(stack.process(s) for s in SERVICES):
            print("The stack is running: `python -m flows.ops.stack stop` before changing ports.")
            return 1
        stack.prefect_port = args.prefect_port or stack.prefect_port
        stack.mlflow_port = args.mlflow_port or stack.mlflow_port
    try:
        if args.command == "start":
            urls = stack.start(args.timeout)
            print(f"Prefect UI: {urls['prefect']}   (work pool {stack.pool!r}, worker online)\n"
                  f"MLflow UI:  {urls['mlflow']}   (tracking {stack.tracking_uri})\n"
                  f"Logs:       {stack.dir}/   Stop: make stack-down")
        elif args.command == "stop":
            stopped = stack.stop()
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        elif args.command == "status":
            for service, s in stack.status().items():
                print(f"{service:15} {'running pid ' + str(s['pid']) if s['running'] else 'stopped':18}"
                      f" log {s['log']}")
            if any(s["running"] for s in stack.status().values()):
                print(json.dumps(stack.health()))
        else:
            print(stack.deploy())
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
