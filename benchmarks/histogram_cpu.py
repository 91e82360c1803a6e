"""CPU time of one data-report length histogram (tasks/data/data_report.py `_histograms`: three role
panels, train and dev overlaid, up to 60 bins) drawn as bars and as filled outlines
(`histtype="stepfilled"`, what the data report draws since 2026-12-01).

    .venv/bin/python benchmarks/histogram_cpu.py

Seeded random lengths of the sample corpus's size; each style drawn once to warm up, then
`--repeats` times. Prints the medians and writes benchmarks/results/histogram_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

from tasks.data import data_report

REPO = Path(__file__).resolve().parents[1]
ROLES = ("system", "user", "assistant")


def draw_seconds(histtype: str, series: dict, folder: Path, repeats: int) -> list[float]:
    """CPU seconds of `_histograms` with each `Axes.hist` call given `histtype`."""
    from matplotlib.axes import Axes

    real = Axes.hist

    def hist(self, *args, **kwargs):
        return real(self, *args, **{**kwargs, "histtype": histtype})

    out = []
    with mock.patch.object(Axes, "hist", hist):
        for i in range(repeats + 1):
            start = time.process_time()
            data_report._histograms(folder / f"{histtype}.png", "lengths", "characters", series)
            if i:                                             # the first one warms up
                out.append(time.process_time() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/histogram_cpu.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    series = {split: {role: rng.integers(5, 300, n) for role in ROLES}
              for split, n in (("train", 239), ("dev", 103))}
    with tempfile.TemporaryDirectory() as tmp:
        rows = {h: draw_seconds(h, series, Path(tmp), args.repeats) for h in ("bar", "stepfilled")}
    result = {h: {"median_cpu_s": round(statistics.median(v), 3), "runs": [round(x, 3) for x in v]}
              for h, v in rows.items()}
    for h, r in result.items():
        print(f"{h:10} {r['median_cpu_s']:.3f} CPU-s per figure (median of {args.repeats})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": datetime.date.today().isoformat(), **result},
                                   indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
