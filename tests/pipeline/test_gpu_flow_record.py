"""A benchmark run cut short keeps what it measured: while benchmarks/gpu_flow.py runs the flow,
its JSON holds the stages completed so far, read back from their MLflow child runs, as the
record of a run that did not finish (a device call's time limit ends it with SIGKILL)."""

from __future__ import annotations

import json

import pytest

from benchmarks import page
from benchmarks.gpu_flow import DiskWatch, Record
from flows.data import data_pipeline
from tasks.config import DataConfig
from tests._ops_config import first_answer_marked

pytestmark = pytest.mark.server


def test_a_cut_run_leaves_its_completed_stages_figures(tmp_path):
    corpus = tmp_path / "qa.txt"
    corpus.write_text(first_answer_marked("（记录）"), encoding="utf-8")
    target = tmp_path / "gpu_flow_tiny.json"
    with DiskWatch(tmp_path) as disk:
        record = Record(target, {"gpu": "none (CPU)", "params": 0}, disk, every=0.2, kind="data")
        record.start()
        assert not target.exists() or json.loads(target.read_text())["stages_done"] == {}
        done = data_pipeline(DataConfig(source=corpus))
        record.stop()
        record.write("by the test, after its flow")
    got = json.loads(target.read_text(encoding="utf-8"))
    assert got["killed"] == "by the test, after its flow" and got["gpu"] == "none (CPU)"
    stages = got["stages_done"]
    assert list(stages) == ["ingest", "conversations", "validate", "data_report"]
    for row, name in zip(done["stages"], stages):
        assert stages[name]["seconds"] == round(row["seconds"], 2), name
        assert stages[name]["device"] == "cpu" and stages[name]["cached"] is False
        assert stages[name]["peak_rss_mib"] > 0 and "other" in stages[name]["phases"]
    assert set(got["disk"]) == {"start_free_gb", "peak_used_gb"}
    lines = page.gpu_flow(got)
    assert lines[0] == "Killed by the test, after its flow. Stages completed:"
    assert sum(line.startswith("| data_report |") for line in lines) == 1
