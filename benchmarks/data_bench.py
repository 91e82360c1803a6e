"""Data-stage benchmark: N synthetic Q/A pairs through the pipeline's own stage cores.

    python benchmarks/data_bench.py                 # 1,000,000 pairs
    python benchmarks/data_bench.py --pairs 100000 --report

Generates a raw Q/A text corpus (README stage 1's txt format, Chinese, ~200 bytes a pair), then runs
ingest (txt -> QA JSON + records as Arrow IPC) -> conversations (conversations, dedup, exact
70/30 split, train/dev JSON + Parquet) -> validate (schemas, every record of qa.json, train.json
and dev.json) with the same functions the Prefect flow calls, printing wall time, CPU time and
peak memory (RSS above the level before the stage, sampled every 5 ms) per stage; "chain" is the
sum of the three. Outputs go to a temporary PIPELINE_HOME that is removed after.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOPICS = ["浇水", "施肥", "光照", "修剪", "换盆", "病虫害", "繁殖", "越冬", "通风", "配土"]
PLANTS = ["绿萝", "多肉", "吊兰", "月季", "兰花", "龟背竹", "发财树", "茉莉", "栀子", "文竹"]


def generate(path: Path, pairs: int, seed: int = 0) -> int:
    """Write `pairs` question/answer blocks; return the file size in bytes."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i in range(pairs):
            plant, topic = rng.choice(PLANTS), rng.choice(TOPICS)
            f.write(f"第{i}盆{plant}的{topic}应该怎么做？\n"
                    f"{plant}{topic}时先看第{i}盆的状态：每周检查一次土壤湿度，保持通风，"
                    f"避免积水导致烂根，必要时减少{topic}的频率。\n\n")
    return path.stat().st_size


class PeakRSS:
    """Peak resident memory while a block runs, sampled in a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.proc = interval, psutil.Process()

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def timed(name: str, fn: Callable[[], Any], rows: list) -> Any:
    import pyarrow as pa

    pa.default_memory_pool().release_unused()        # what earlier stages freed goes back
    with PeakRSS() as mem:
        t, cpu = time.perf_counter(), time.process_time()
        result = fn()
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    rows.append((name, seconds, (mem.peak - mem.start) / 2**20, mem.peak / 2**20, cpu))
    print(f"{name:<14} {seconds:6.2f} s wall {cpu:6.2f} s CPU   peak +{rows[-1][2]:5.0f} MiB "
          f"(RSS {rows[-1][3]:5.0f} MiB)", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--report", action="store_true", help="also run the data report stage")
    ap.add_argument("--keep", action="store_true", help="keep the temporary outputs")
    args = ap.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="data-bench-"))
    os.environ["PIPELINE_HOME"] = str(home)
    from tasks.data.conversations import build_conversations
    from tasks.data.data_report import build_data_report
    from tasks.data.ingest import ingest
    from tasks.data.validate import validate_data

    try:
        corpus = home / "corpus.txt"
        t = time.perf_counter()
        size = generate(corpus, args.pairs)
        print(f"corpus: {args.pairs:,} pairs, {size / 2**20:.0f} MiB of UTF-8 text "
              f"(generated in {time.perf_counter() - t:.1f} s, not timed below); "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        rows: list = []
        qa = timed("ingest", lambda: ingest(corpus), rows)
        data = timed("conversations",
                     lambda: build_conversations(qa.out.records_arrow), rows)
        checked = timed("validate", lambda: validate_data(qa.out, data.out), rows)
        if args.report:
            timed("data_report", lambda: build_data_report(qa.out, data.out), rows)
        wall, cpu = sum(r[1] for r in rows[:3]), sum(r[4] for r in rows[:3])
        peak = max(r[3] for r in rows)
        print(f"{'chain (3)':<14} {wall:6.2f} s wall {cpu:6.2f} s CPU   peak RSS {peak:.0f} MiB "
              f"= {peak * 2**20 / size:.1f} x the input; load average now "
              f"{os.getloadavg()[0]:.1f}")
        assert data.out.train_records == round(args.pairs * 0.7)
        assert checked.out.validated_by == {"qa": "fast", "train": "fast", "dev": "fast"}
        print("records:", {"qa_pairs": qa.out.qa_pairs, "train_records": data.out.train_records,
                           "dev_records": data.out.dev_records},
              "validated by:", checked.out.validated_by)
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
