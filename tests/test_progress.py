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


def test_the_data_stages_report_their_steps_on_a_large_input(tmp_path, monkeypatch, caplog):
    """Vectorised data stages have no loop to count: they count their steps (read, each file
    written or validated), each line naming it. 200,000 generated Q/A pairs (the size where a
    step starts to take seconds on a 2-core machine); every step is logged here (`EVERY_S=0`)."""
    from benchmarks.data_bench import generate
    from tasks import progress
    from tasks.conversations import build_conversations
    from tasks.ingest import ingest
    from tasks.validate import validate

    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    source = tmp_path / "big_qa.txt"
    generate(source, 200_000)
    with caplog.at_level(logging.INFO, logger="tasks.progress"):
        qa = ingest(source)
        data = build_conversations(qa.file("records_arrow"), shuffle_seed=0)
        validate({"train": (data.file("train_json"), "conversation"),
                  "dev": (data.file("dev_json"), "conversation")})
    lines = [r.getMessage() for r in caplog.records]
    step = r"(\d)/(\d) \((.+)\), \d+ s elapsed, about \d+ s left"
    got = [(m[1], m[2], m[3], m[4]) for m in (re.fullmatch(rf"(.+?): {step}", x) for x in lines)
           if m]
    assert got == [("ingest big_qa.txt", "1", "3", "read 200,000 records"),
                   ("ingest big_qa.txt", "2", "3", "wrote records.arrow"),
                   ("conversations", "1", "3", "140,000 train and 60,000 dev records"),
                   ("conversations", "2", "3", "wrote train"),
                   ("validate", "1", "2", "train: 140,000 records")], lines
