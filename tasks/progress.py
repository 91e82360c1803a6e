"""Progress of a long loop: step/total and an ETA, in the terminal (a tqdm bar, where stderr is
a terminal) and, every `every_s` seconds, as a line on the `tasks` logger, which the flows put in
Prefect's task-run log (PREFECT_LOGGING_EXTRA_LOGGERS=tasks). No Prefect import here."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm

from tasks.resources import own_peak_rss_mib, rss_mib

log = logging.getLogger("tasks.progress")

#: seconds between two progress lines on the logger (the terminal bar updates every second)
EVERY_S = 10.0
#: a `step` shorter than this is not logged
STEP_MIN_S = 1.0


class Progress:
    """`with Progress("pretraining", total) as p: ... p.update()`. Work without a loop to count
    (the data stages' vectorised steps) counts its steps: `p.update(note="read 1,000 records")`;
    a line is logged only where `every_s` seconds passed since the last one."""

    def __init__(self, desc: str, total: int, every_s: float | None = None):
        self.desc, self.total = desc, total
        self.every_s = EVERY_S if every_s is None else every_s
        self.done, self.start = 0, time.monotonic()
        self.last_log = self.start
        self.bar = tqdm(total=total, desc=desc, mininterval=1.0, leave=False, disable=None,
                        dynamic_ncols=True)

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        self.bar.update(n)
        now = time.monotonic()
        if now - self.last_log >= self.every_s and self.done < self.total:
            self.last_log = now
            rate = self.done / (now - self.start)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("%s: %d/%d%s, %.0f s elapsed, about %.0f s left", self.desc, self.done,
                     self.total, f" ({note})" if note else "", now - self.start, eta)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *_) -> None:
        self.close()


@contextmanager
def step(what: str) -> Iterator[None]:
    """Log `what` once it is done, if it took STEP_MIN_S or more, with its seconds and this
    process's host memory: a model stage's long steps (a 6 B load, save or hash) in Prefect's
    task-run log, where a stage was otherwise silent for a minute."""
    start = time.monotonic()
    yield
    seconds = time.monotonic() - start
    if seconds >= STEP_MIN_S:
        log.info("%s: %.1f s (host RSS %s MiB, peak so far %s MiB)", what, seconds,
                 f"{rss_mib():,.0f}", f"{own_peak_rss_mib():,.0f}")
