"""Preference tuning on the embedded default, as a user runs it: `configs/dpo.yaml` through the
pipeline flow in a fresh project home (cold: every stage computed), on this machine's CPU.

    PYTHONPATH=. python benchmarks/preference_cpu.py
    PYTHONPATH=. python benchmarks/preference_cpu.py --config my_dpo.yaml

Writes benchmarks/results/preference_cpu_default.json: per stage seconds and peak host RSS, the
preference stage's throughput, and the preference accuracy of base, supervised and tuned model
on the dev pairs (README "Preference tuning").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "dpo.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    os.environ["PIPELINE_HOME"] = tempfile.mkdtemp(prefix="preference-cpu-")
    from flows.ops.startup import prepare

    prepare()                                         # before Prefect is imported
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("PREFECT_API_URL", None)
    from benchmarks.gpu_flow import preference_figures, stage_table
    from benchmarks.timed import cpu_model
    from flows.pipeline import pipeline
    from tasks.config.load import load_config

    start = time.perf_counter()
    out = pipeline(load_config(args.config))
    result = {"date": datetime.date.today().isoformat(), "machine": cpu_model(),
              "command": "PYTHONPATH=. python " + " ".join(map(shlex.quote, sys.argv)),
              "config": str(args.config.resolve().relative_to(REPO)),
              "flow_seconds": round(time.perf_counter() - start, 1),
              "stages": stage_table(out), "preference": preference_figures(out)}
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "preference_cpu_default.json"
    target.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["preference"], indent=1))
    print(f"flow {result['flow_seconds']} s; wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
