"""Time a command as a user runs it and keep the figure with its origin: wall and CPU seconds,
exit code, date, machine and the lines of its output that summarise it, in
benchmarks/results/<name>.json (docs/benchmarks.md is generated from there).

    .venv/bin/python benchmarks/timed.py make_run -- make run
    .venv/bin/python benchmarks/timed.py make_test -- bash .ci/run    # a clean clone's CI
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"Pipeline finished|stages were cache hits|=+ .*(passed|failed).* =+|^real")


def cpuinfo() -> str:
    return Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").is_file() \
        else ""


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo; else what `platform` knows)."""
    return next((line.split(":", 1)[1].strip() for line in cpuinfo().splitlines()
                 if line.startswith("model name")), platform.processor() or "unknown")


def cpu_model() -> str:
    """The machine a figure comes from: model, cores and whether it has AVX512-BF16."""
    bf16 = "yes" if "avx512_bf16" in cpuinfo().split() else "no"
    return f"{cpu_model_name()}, {os.cpu_count()} cores, AVX512-BF16 {bf16}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="result name: benchmarks/results/<name>.json")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(command, cwd=Path.cwd(), capture_output=True, text=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    output = proc.stdout + proc.stderr
    sys.stdout.write(output[-4000:])
    result = {"date": datetime.date.today().isoformat(), "machine": cpu_model(),
              "command": " ".join(command), "exit_code": proc.returncode,
              "wall_s": round(wall, 1),
              "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                             1),
              "output_lines": len(output.splitlines()),
              "summary": [line for line in output.splitlines() if SUMMARY.search(line)][-4:]}
    target = REPO / "benchmarks" / "results" / f"{args.name}.json"
    target.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\n{target}: {result['wall_s']} s, exit {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
