"""What headless Chromium costs while it shows a running flow in the Prefect UI: a local stack
(flows/ops/stack.py, own home and ports), a flow of 60 three-second tasks reporting to it, and for
each page 40 s of Chromium's CPU time (all its processes) per second of wall time:

* the flow-run page (its live run graph is WebGL, which headless Chromium draws in software);
* the same page with Chromium's 3D APIs off (no graph);
* the Runs list, where tests/ops/test_stack_browser.py waits for its run.

    .venv/bin/python benchmarks/ui_graph_cpu.py       # needs /usr/bin/chromium (`make browsers`)

Prints one line per page and writes benchmarks/results/ui_graph_cpu.json (see `--out`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows.ops.stack import Stack, free_port  # noqa: E402
from tests._browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402  (the browser test's flags)

FLOW = textwrap.dedent("""
    import time
    from prefect import flow, task

    @task
    def step(i):
        time.sleep(3)

    @flow
    def slow():
        for i in range(60):
            step(i)

    slow()
""")


def chromium_cpu_s() -> float:
    total = 0.0
    for p in psutil.process_iter():
        try:
            if "chromium" in " ".join(p.cmdline()):
                t = p.cpu_times()
                total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/ui_graph_cpu.json")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    home = Path(tempfile.mkdtemp(prefix="ui-graph-cpu-"))
    stack = Stack(home=home, prefect_port=free_port(), mlflow_port=free_port())
    stack.start(timeout=300)
    script = home / "slow_flow.py"
    script.write_text(FLOW, encoding="utf-8")
    flow = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "PREFECT_API_URL": stack.api_url})
    try:
        while not (runs := httpx.post(f"{stack.api_url}/flow_runs/filter", json={}).json()):
            time.sleep(1)
        run_page = f"{stack.prefect_url}/runs/flow-run/{runs[0]['id']}"
        pages = {"flow-run page": (run_page, []),
                 "flow-run page, 3D APIs off": (run_page, ["--disable-3d-apis"]),
                 "Runs list": (f"{stack.prefect_url}/runs", [])}
        cores: dict[str, float] = {}
        with sync_playwright() as p:
            for name, (url, extra) in pages.items():
                browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                            args=CHROMIUM_ARGS + extra)
                page = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
                page.goto(url)
                page.wait_for_timeout(5000)                       # loaded and drawing
                cpu, start = chromium_cpu_s(), time.monotonic()
                page.wait_for_timeout(args.seconds * 1000)
                cores[name] = round((chromium_cpu_s() - cpu) / (time.monotonic() - start), 3)
                browser.close()
                print(f"{name}: Chromium used {cores[name]:.2f} cores", flush=True)
    finally:
        flow.kill()
        stack.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "cores_used": cores,
        "seconds_per_page": args.seconds, "machine_cores": psutil.cpu_count()}, indent=1) + "\n",
        encoding="utf-8")


if __name__ == "__main__":
    main()
