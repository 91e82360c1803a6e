"""Orchestration overhead of the data flow at scale: the stage cores alone vs the real flow
(Prefect + MLflow), first run and cached re-run, on N synthetic Q/A pairs.

    python benchmarks/flow_overhead.py                      # 1,000,000 pairs
    python benchmarks/flow_overhead.py --pairs 20000 --out /tmp/overhead.json

One process tree, one temporary project home per part (removed after):

1. the corpus, from `data_bench.generate` (not timed);
2. the cores: ingest -> conversations -> validate -> data_report, the very functions the flow's
   tasks call, in this process, once before the flows and once after them (`cores_s` is the
   mean of the two sums: a shared machine's load drifts while the flows run);
3. the temporary Prefect server a command-line run starts when no stack is up, booted alone:
   on a new project (its database created) and again (`server_start_s`);
4. `python -m flows.data --set source=<corpus>` with the local stack up (`python -m flows.ops.stack
   start`: the run uses the stack's Prefect server, so no server start is in it): a first run
   and a cached re-run. `flow_first_s` / `flow_cached_s` are the wall times of those commands,
   from the process's start to its exit; `stages` are each stage's seconds including its
   MLflow logging, read from the run's MLflow metrics (flows/running.py `PipelineRun.timings`);
5. the same two commands without the stack: each starts its own temporary server
   (`temporary_server`: wall, time before the first stage, how long the run waited for the
   server).

Prints a table and writes benchmarks/results/flow_overhead.json (see `--out`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from data_bench import generate, timed  # noqa: E402

from flows.ops.stack import free_port  # noqa: E402

STAGES = ("ingest", "conversations", "validate", "data_report")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_")) and k != "PIPELINE_HOME"}
    return {**env, "PIPELINE_HOME": str(home), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def run_cores(corpus: Path, home: Path) -> dict[str, float]:
    """The four stage cores in this process; seconds per stage."""
    os.environ["PIPELINE_HOME"] = str(home)
    from tasks.data.conversations import build_conversations
    from tasks.data.data_report import build_data_report
    from tasks.data.ingest import ingest
    from tasks.data.validate import validate_data

    home.mkdir()
    rows: list = []
    qa = timed("ingest", lambda: ingest(corpus), rows)
    data = timed("conversations", lambda: build_conversations(qa.out.records_arrow), rows)
    timed("validate", lambda: validate_data(qa.out, data.out), rows)
    timed("data_report", lambda: build_data_report(qa.out, data.out), rows)
    return {name: seconds for name, seconds, *_ in rows} | {
        "cpu": sum(cpu for *_, cpu in rows)}


def boot_server(home: Path) -> float:
    """Seconds a command-line run's temporary Prefect server takes to answer, booted alone."""
    code = ("import flows.ops.startup as s; s.prepare(); s.launch_temporary_server(); "
            "s.wait_for_server(); "
            "print(s.temporary_server().ready_seconds)")
    out = subprocess.run([sys.executable, "-c", code], env=_env(home), cwd=REPO, check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_flow(home: Path, corpus: Path, log: Path) -> dict[str, Any]:
    """`python -m flows.data` once: its wall and CPU time (its own and its children's) and the
    timings it logged to MLflow."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "ab") as f:
        subprocess.run([sys.executable, "-m", "flows.data", "--set", f"source={corpus}"],
                       env=_env(home), cwd=REPO, check=True, stdout=f, stderr=subprocess.STDOUT)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("finetune-pipeline")
    run = client.search_runs([exp.experiment_id], "tags.`pipeline.kind` = 'data'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    m = run.data.metrics
    kids = client.search_runs([exp.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    return {"wall_s": wall, "cpu_s": cpu, "startup_s": m["startup_seconds"],
            "stages": {s: m[f"stage_total_seconds.{s}"] for s in STAGES},
            "cached": {k.info.run_name: k.data.tags["pipeline.cache"] == "hit" for k in kids},
            "server_start_s": m.get("server_start_seconds"),
            "server_wait_s": m.get("server_wait_seconds"),
            "prefect_url": run.data.tags.get("prefect.flow_run_url", "")}


def first_and_cached(home: Path, corpus: Path, log: Path) -> tuple[dict, dict]:
    first, cached = run_flow(home, corpus, log), run_flow(home, corpus, log)
    assert not any(first["cached"].values()) and all(cached["cached"].values()), \
        (first["cached"], cached["cached"])
    return first, cached


def stack(home: Path, *args: str) -> None:
    """`python -m flows.ops.stack ...` for this home (its ports are remembered by `stop`)."""
    subprocess.run([sys.executable, "-m", "flows.ops.stack", *args], env=_env(home), cwd=REPO,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/flow_overhead.json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary homes and logs")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="flow-overhead-"))
    homes = {name: root / name for name in ("stack", "temporary")}
    for home in homes.values():
        home.mkdir()
    loads = {}
    try:
        corpus = root / "corpus.txt"
        size = generate(corpus, args.pairs)
        print(f"corpus: {args.pairs:,} pairs, {size / 2**20:.0f} MiB; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}; logs in {root}", flush=True)
        loads["cores"] = os.getloadavg()[0]
        cores_before = run_cores(corpus, root / "cores-before")
        print(f"{'cores (4)':<14} {sum(cores_before[s] for s in STAGES):6.2f} s", flush=True)

        loads["server"] = os.getloadavg()[0]
        server_first = boot_server(homes["temporary"])           # new project: DB created
        server = boot_server(homes["temporary"])
        print(f"temporary Prefect server: {server_first:.2f} s to answer on a new project, "
              f"{server:.2f} s after", flush=True)

        loads["stack"] = os.getloadavg()[0]
        prefect_port = free_port()
        stack(homes["stack"], "start", "--prefect-port", str(prefect_port), "--mlflow-port",
              str(free_port()))
        try:
            first, cached = first_and_cached(homes["stack"], corpus, root / "stack.log")
        finally:
            stack(homes["stack"], "stop")
        assert first["prefect_url"].startswith(f"http://127.0.0.1:{prefect_port}/") and \
            first["server_start_s"] is None, "the run did not use the stack's Prefect server"

        loads["temporary"] = os.getloadavg()[0]
        t_first, t_cached = first_and_cached(homes["temporary"], corpus,
                                             root / "temporary.log")
        loads["cores_after"] = os.getloadavg()[0]
        cores_after = run_cores(corpus, root / "cores-after")
        print(f"{'cores (4)':<14} {sum(cores_after[s] for s in STAGES):6.2f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    cores = {s: (cores_before[s] + cores_after[s]) / 2 for s in (*STAGES, "cpu")}
    cores_s = sum(cores[s] for s in STAGES)
    result = {
        "pairs": args.pairs, "cores_s": round(cores_s, 2),
        "flow_first_s": round(first["wall_s"], 2), "flow_cached_s": round(cached["wall_s"], 2),
        "server_start_s": round(server, 2),
        "stages": {s: {"first_s": round(first["stages"][s], 2),
                       "cached_s": round(cached["stages"][s], 2)} for s in STAGES},
        "cores": {s: round(cores[s], 2) for s in STAGES},
        "cores_runs_s": [round(sum(c[s] for s in STAGES), 2) for c in (cores_before,
                                                                     cores_after)],
        "cpu_s": {"cores": round(cores["cpu"], 2), "flow_first": round(first["cpu_s"], 2),
                  "flow_cached": round(cached["cpu_s"], 2)},
        "startup_s": {"first": round(first["startup_s"], 2),
                      "cached": round(cached["startup_s"], 2)},
        "server_first_start_s": round(server_first, 2),
        "temporary_server": {
            run: {"wall_s": round(r["wall_s"], 2), "startup_s": round(r["startup_s"], 2),
                  "server_start_s": round(r["server_start_s"], 2),
                  "server_wait_s": round(r["server_wait_s"], 2),
                  "stages_s": round(sum(r["stages"].values()), 2)}
            for run, r in (("first", t_first), ("cached", t_cached))},
        "first_over_cores": round(first["wall_s"] / cores_s, 2),
        "cached_stages_s": round(sum(cached["stages"].values()), 2),
        "corpus_mib": round(size / 2**20, 1), "cpus": os.cpu_count(),
        "load_average": {k: round(v, 2) for k, v in loads.items()},
        "date": datetime.date.today().isoformat(),
    }
    print()
    print("| stage | core | flow, first run | flow, cached re-run |\n|---|---:|---:|---:|")
    for s in STAGES:
        print(f"| {s} | {cores[s]:.2f} s | {first['stages'][s]:.2f} s | "
              f"{cached['stages'][s]:.2f} s |")
    print(f"| before the first stage | – | {first['startup_s']:.2f} s | "
          f"{cached['startup_s']:.2f} s |")
    print(f"| **whole command** | **{cores_s:.2f} s** | **{first['wall_s']:.2f} s** | "
          f"**{cached['wall_s']:.2f} s** |")
    print()
    print(f"first run / cores: {result['first_over_cores']:.2f}x (target <= 2); cached "
          f"stages: {result['cached_stages_s']:.2f} s (target <= 2)")
    for run, r in result["temporary_server"].items():
        print(f"without the stack, {run}: {r['wall_s']:.2f} s, of which {r['startup_s']:.2f} s"
              f" before the first stage; its server took {r['server_start_s']:.2f} s to boot "
              f"and the run waited {r['server_wait_s']:.2f} s for it")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
