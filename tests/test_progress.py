"""Long loops report step/total and an ETA on the `tasks` logger (Prefect's task-run log)."""

from __future__ import annotations

import logging
import re

from tasks.progress import Progress


def test_progress_logs_steps_and_an_eta(caplog):
    with caplog.at_level(logging.INFO, logger="tasks.progress"):
        with Progress("pretraining", total=4, every_s=0.0) as p:
            for _ in range(4):
                p.update()
    lines = [r.getMessage() for r in caplog.records]
    assert [re.match(r"pretraining: (\d)/4, \d+ s elapsed, about \d+ s left", m)[1]
            for m in lines] == ["1", "2", "3"]            # the last step is "done", not logged


def test_progress_is_quiet_between_intervals(caplog):
    with caplog.at_level(logging.INFO, logger="tasks.progress"):
        with Progress("answers", total=100, every_s=3600) as p:
            for _ in range(100):
                p.update()
    assert not caplog.records
