"""Progress of a long loop: step/total and an ETA, in the terminal (a tqdm bar, where stderr is
a terminal) and, every `every_s` seconds, as a line on the `tasks` logger, which the flows put in
Prefect's task-run log (PREFECT_LOGGING_EXTRA_LOGGERS=tasks). No Prefect import here.

The ETA comes from the recent rate (the last `WINDOW_S` seconds of steps), not the average
since the start: a loop whose first steps are slow (a warm-up, a first allocation) would
otherwise promise twenty minutes for what takes twenty seconds."""

from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm

from tasks.runtime.resources import add_phase, own_peak_rss_mib, rss_mib

log = logging.getLogger(__name__)

#: seconds between two progress lines on the logger (the terminal bar updates every second)
EVERY_S = 10.0
#: a `step` shorter than this is not logged
STEP_MIN_S = 1.0
#: the ETA's rate is measured over the steps of the last this many seconds
WINDOW_S = 5.0


class Progress:
    """`with Progress("pretraining", total) as p: ... p.update()`. Work without a loop to count
    (the data stages' vectorised steps) counts its steps: `p.update(note="read 1,000 records")`;
    a line is logged only where `every_s` seconds passed since the last one."""

    def __init__(self, desc: str, total: int, every_s: float | None = None):
        self.desc, self.total = desc, total
        self.every_s = EVERY_S if every_s is None else every_s
        self.done, self.start = 0, time.monotonic()
        self.last_log = self.start
        self.recent: deque[tuple[float, int]] = deque([(self.start, 0)])
        self.bar = tqdm(total=total, desc=desc, mininterval=1.0, leave=False, disable=None,
                        dynamic_ncols=True)

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        self.bar.update(n)
        now = time.monotonic()
        self.recent.append((now, self.done))
        while len(self.recent) > 2 and now - self.recent[1][0] >= WINDOW_S:
            self.recent.popleft()
        if now - self.last_log >= self.every_s and self.done < self.total:
            self.last_log = now
            log.info("%s: %d/%d%s, %.0f s elapsed, about %.0f s left", self.desc, self.done,
                     self.total, f" ({note})" if note else "", now - self.start, self.eta(now))

    def eta(self, now: float | None = None) -> float:
        """Seconds left at the recent rate (module docstring)."""
        now = time.monotonic() if now is None else now
        (t0, d0), (t1, d1) = self.recent[0], self.recent[-1]
        rate = (d1 - d0) / (t1 - t0) if t1 > t0 and d1 > d0 else 0.0
        return (self.total - self.done) / rate if rate > 0 else float("inf")

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *_) -> None:
        self.close()


@contextmanager
def step(what: str, phase: str | None = None) -> Iterator[None]:
    """Log `what` once it is done, if it took STEP_MIN_S or more, with its seconds and this
    process's host memory: a model stage's long steps (a 6 B load, save or hash) in Prefect's
    task-run log, where a stage was otherwise silent for a minute. `phase`: count its seconds
    as that phase of the stage (`tasks.runtime.resources.add_phase`), however short."""
    start = time.monotonic()
    yield
    seconds = time.monotonic() - start
    if phase is not None:
        add_phase(phase, seconds)
    if seconds >= STEP_MIN_S:
        log.info("%s: %.1f s (host RSS %s MiB, peak so far %s MiB)", what, seconds,
                 f"{rss_mib():,.0f}", f"{own_peak_rss_mib():,.0f}")
