"""Long loops report step/total and an ETA on the `tasks` logger (Prefect's task-run log)."""

from __future__ import annotations

import logging
import re

from tasks.runtime.progress import Progress


def test_progress_logs_steps_and_an_eta(caplog):
    with caplog.at_level(logging.INFO, logger="tasks.runtime.progress"):
        with Progress("pretraining", total=4, every_s=0.0) as p:
            for _ in range(4):
                p.update()
    lines = [r.getMessage() for r in caplog.records]
    assert [re.match(r"pretraining: (\d)/4, \d+ s elapsed, about \d+ s left", m)[1]
            for m in lines] == ["1", "2", "3"]            # the last step is "done", not logged


def test_the_eta_follows_the_recent_rate_not_a_slow_start(monkeypatch):
    """A loop whose first steps were slow (here: three steps in 30 s, then a step every 0.1 s)
    is given the time its current pace needs, not thirty times that."""
    from tasks.runtime import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    p = Progress("pretraining", total=400, every_s=3600)
    for _ in range(3):
        clock[0] += 10.0
        p.update()
    for _ in range(100):
        clock[0] += 0.1
        p.update()
    assert abs(p.eta() - 297 * 0.1) < 1.0          # 297 steps left at 10 steps a second
    p.close()


def test_progress_is_quiet_between_intervals(caplog):
    with caplog.at_level(logging.INFO, logger="tasks.runtime.progress"):
        with Progress("answers", total=100, every_s=3600) as p:
            for _ in range(100):
                p.update()
    assert not caplog.records


def test_the_data_stages_report_their_steps_on_a_large_input(tmp_path, monkeypatch, caplog):
    """Vectorised data stages have no loop to count: they count their steps (read, each file
    written or validated), each line naming it. 200,000 generated Q/A pairs (the size where a
    step starts to take seconds on a 2-core machine); every step is logged here (`EVERY_S=0`)."""
    from benchmarks.data_bench import generate
    from tasks.runtime import progress
    from tasks.data.conversations import build_conversations
    from tasks.data.ingest import ingest
    from tasks.data.validate import validate

    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    source = tmp_path / "big_qa.txt"
    generate(source, 200_000)
    with caplog.at_level(logging.INFO, logger="tasks.runtime.progress"):
        qa = ingest(source)
        data = build_conversations(qa.out.records_arrow, shuffle_seed=0)
        validate({"train": (data.out.train_json, "conversation"),
                  "dev": (data.out.dev_json, "conversation")})
    lines = [r.getMessage() for r in caplog.records]
    step = r"(\d)/(\d) \((.+)\), \d+ s elapsed, about \d+ s left"
    got = [(m[1], m[2], m[3], m[4]) for m in (re.fullmatch(rf"(.+?): {step}", x) for x in lines)
           if m]
    assert got == [("ingest big_qa.txt", "1", "3", "read 200,000 records"),
                   ("ingest big_qa.txt", "2", "3", "wrote records.arrow"),
                   ("conversations", "1", "3", "140,000 train and 60,000 dev records"),
                   ("conversations", "2", "3", "wrote train"),
                   ("validate", "1", "2", "train: 140,000 records")], lines


def test_a_model_stage_logs_its_long_steps_with_host_memory(tmp_path, monkeypatch, caplog):
    """Loading, saving and hashing each say how long they took and the host memory then (at
    6 B each takes seconds; here every step is logged, `STEP_MIN_S=0`)."""
    from tasks.runtime import progress
    from tasks.export.merge import merge_adapter
    from tests._tiny_model import make_all

    base, adapter = make_all(tmp_path / "tiny")
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(progress, "STEP_MIN_S", 0.0)
    with caplog.at_level(logging.INFO, logger="tasks.runtime.progress"):
        merge_adapter(base, adapter)
    tail = r": \d+\.\d s \(host RSS [\d,]+ MiB, peak so far [\d,]+ MiB\)$"
    lines = [r.getMessage() for r in caplog.records]
    for what in (rf"loaded {re.escape(str(base))} onto cpu", r"saved the model to .*\.staging-.*",
                 r"hashed the files of merge's output"):
        assert any(re.fullmatch(what + tail, m) for m in lines), (what, lines)
    caplog.clear()
    monkeypatch.setattr(progress, "STEP_MIN_S", 3600.0)
    with caplog.at_level(logging.INFO, logger="tasks.runtime.progress"):
        merge_adapter(base, adapter)
    assert not caplog.records                                # short steps stay quiet
