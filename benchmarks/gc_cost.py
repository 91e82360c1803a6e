"""Python's cyclic garbage collector inside a flow: the tiny operations config
(tests/_ops_config.py) through the full pipeline flow, in this process, on a new project home,
`--runs` times, each on a corpus of its own (so every stage computes). For each run: its wall
time, and the time the collector took (`gc.callbacks`: all collections, and the full ones).

    python benchmarks/gc_cost.py                  # as the flows run (tasks/runtime/resources.py)
    python benchmarks/gc_cost.py --collect-all    # as before: no survivor is set aside, so
                                                  # every full collection walks every object

The first run in a process also pays the imports, Prefect's temporary server and the fork
server of the benchmark stage; later runs show a run's own cost. Prints one line per run and
writes benchmarks/results/gc_cost.json (gc_cost_collect_all.json), see `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class CollectorClock:
    """Seconds spent in collections, counted through `gc.callbacks`."""

    def __init__(self) -> None:
        self.count = self.full = 0
        self.seconds = self.full_seconds = 0.0
        self._began = 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        took = time.perf_counter() - self._began
        self.count, self.seconds = self.count + 1, self.seconds + took
        if info["generation"] == 2:
            self.full, self.full_seconds = self.full + 1, self.full_seconds + took

    def snapshot(self) -> dict[str, float]:
        return {"collections": self.count, "gc_s": round(self.seconds, 2),
                "full_collections": self.full, "full_gc_s": round(self.full_seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--collect-all", action="store_true",
                    help="the behaviour before survivors were set aside (gc.freeze a no-op)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="gc-cost-"))
    os.environ.update(PIPELINE_HOME=str(home), PREFECT_HOME=str(home / ".prefect"),
                      HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    sys.path.insert(0, str(REPO))
    from flows.ops.startup import prepare

    prepare()
    from flows.pipeline import pipeline
    from tasks.config import PipelineConfig
    from tests._ops_config import TINY, first_answer_marked

    if args.collect_all:
        import tasks.runtime.resources

        tasks.runtime.resources.gc = type("NoFreeze", (), {"collect": staticmethod(gc.collect),
                                                   "freeze": staticmethod(lambda: None),
                                                   "unfreeze": staticmethod(gc.unfreeze)})
    clock, runs = CollectorClock(), []
    for i in range(args.runs):
        corpus = home / f"corpus-{i}.txt"
        corpus.write_text(first_answer_marked(f"（gc {i}）"), encoding="utf-8")
        before, start = clock.snapshot(), time.perf_counter()
        out = pipeline(PipelineConfig(**TINY, data={"source": str(corpus)}))
        after = clock.snapshot()
        row = {"run": i + 1, "wall_s": round(time.perf_counter() - start, 2),
               "computed": sum(not r["cached"] for r in out["stages"]),
               **{k: round(after[k] - before[k], 2) for k in after}}
        runs.append(row)
        print(f"run {row['run']}: {row['wall_s']} s, {row['computed']} stages computed; "
              f"collector {row['gc_s']} s in {row['collections']} collections, "
              f"{row['full_gc_s']} s of it in {row['full_collections']} full ones", flush=True)
    name = "gc_cost_collect_all.json" if args.collect_all else "gc_cost.json"
    out_path = args.out or REPO / "benchmarks" / "results" / name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "collect_all": args.collect_all,
        "cpus": len(os.sched_getaffinity(0)), "load_avg_1m": os.getloadavg()[0],
        "runs": runs}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
