"""Where the test suite's CPU goes: run `make test` (or any command) while sampling the CPU time
of every process on the machine twice a second, and sum it by kind of process (pytest workers,
Prefect servers, MLflow servers, command-line runs, Chromium, fork-server children, ...).

    .venv/bin/python benchmarks/suite_cpu.py                    # make test
    .venv/bin/python benchmarks/suite_cpu.py -- make test-fast

On the 2-core CI machine the suite is bound by the CPU (README "Tests"): its wall time is about
its CPU seconds over two, so this says what to make cheaper. A process that lives less than half
a second may be missed, and one that exits loses its last half second; a process already running
at the start counts from then on. Prints the totals and
writes benchmarks/results/suite_cpu.json (see `--out`): the totals by kind, and each process of
at least one CPU second with its command line and when it started (seconds after the start).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def kind(cmdline: list[str]) -> str:
    """What a process is, from its command line."""
    c = " ".join(cmdline)
    rules = [("chromium", "chromium"), ("prefect server start", "prefect-server (stack)"),
             ("prefect.server.api.server", "prefect-server (temporary)"),
             ("prefect.runner._workspace_supervisor", "flow run of the stack's worker"),
             ("prefect worker", "prefect-worker"), ("mlflow server", "mlflow-server"),
             ("mlflow models serve", "mlflow model server"),
             ("multiprocessing.forkserver", "fork server and its children"),
             ("exec(eval(sys.stdin.readline()))", "pytest worker (xdist)"),
             ("-m pytest", "pytest (controller)")]
    for needle, name in rules:
        if needle in c:
            return name
    if "uvicorn" in c and "prefect" in c:
        return "prefect-server (temporary)"
    if "gunicorn" in c or ("uvicorn" in c and "mlflow" in c):
        return "mlflow-server"
    if m := re.search(r"-m (flows\.\w+)", c):
        return f"command line: {m.group(1)}"
    return Path(cmdline[0]).name if cmdline else "unknown"


#: kinds that a process may have only until it execs its own program: named again next time
UNNAMED = ("unknown", "python", "python3")


class Sampler(threading.Thread):
    """CPU seconds (user + system) of every process seen, by (pid, start time)."""

    def __init__(self, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.every_s, self.done = every_s, threading.Event()
        self.seen: dict[tuple[int, float], list] = {}    # -> [kind, cpu seconds, command line]
        self.before: dict[tuple[int, float], float] = {}      # CPU of those already running
        self.started = time.time()

    def run(self) -> None:
        me = psutil.Process().pid
        first = True
        while not self.done.is_set():
            for p in psutil.process_iter(["pid", "create_time"]):
                if p.info["pid"] == me:
                    continue
                try:
                    t = p.cpu_times()
                    key = (p.info["pid"], p.info["create_time"])
                    if self.seen.get(key, [UNNAMED[0]])[0] in UNNAMED:   # new, or seen
                        cmd = p.cmdline()                             # before its exec
                        self.seen[key] = [kind(cmd), 0.0, " ".join(cmd)[:300]]
                    self.seen[key][1] = t.user + t.system
                    if first:                                 # counted from now on only
                        self.before[key] = t.user + t.system
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            first = False
            self.done.wait(self.every_s)

    def totals(self) -> list[dict]:
        out: dict[str, list] = {}
        for key, (name, cpu, _) in self.seen.items():
            out.setdefault(name, [0.0, 0])
            out[name][0] += cpu - self.before.get(key, 0.0)
            out[name][1] += 1
        return sorted(({"kind": k, "cpu_s": round(v[0], 1), "processes": v[1]}
                       for k, v in out.items()), key=lambda r: -r["cpu_s"])

    def processes(self, at_least_s: float = 1.0) -> list[dict]:
        """Every process that used at least `at_least_s` CPU seconds, the costliest first: what
        each kind is made of."""
        rows = [{"cpu_s": round(cpu - self.before.get(key, 0.0), 1), "kind": name,
                 "started_s": round(key[1] - self.started, 1), "command": cmd}
                for key, (name, cpu, cmd) in self.seen.items()]
        return sorted((r for r in rows if r["cpu_s"] >= at_least_s), key=lambda r: -r["cpu_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/suite_cpu.json")
    ap.add_argument("command", nargs="*", default=["make", "test"])
    args = ap.parse_args()
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    code = subprocess.call(args.command, cwd=REPO)
    wall = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    totals = sampler.totals()
    cpu = sum(r["cpu_s"] for r in totals)
    for r in totals[:15]:
        print(f"{r['cpu_s']:8.1f} CPU-s  {r['processes']:4d} processes  {r['kind']}")
    print(f"{cpu:.0f} CPU-s in {wall:.0f} s on {psutil.cpu_count()} cores "
          f"({cpu / wall / psutil.cpu_count():.0%} busy); exit code {code}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "command": args.command, "exit_code": code,
        "wall_s": round(wall, 1), "cores": psutil.cpu_count(), "cpu_s": round(cpu, 1),
        "by_kind": totals, "processes": sampler.processes()}, indent=1) + "\n",
        encoding="utf-8")


if __name__ == "__main__":
    main()
