"""Faults injected for real (docs/design.md "Failure modes"): a flow process killed mid-stage with
SIGKILL, SIGTERM or Ctrl-C, then run again; published outputs tampered with or truncated; a
pickle planted in the result cache; two first runs started together on a new project home."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from flows.data import data_pipeline
from flows.tracking import tracking_uri
from tasks.runtime.paths import project_dir
from tasks.config import DataConfig
from tests._ops_config import SAMPLE, first_answer_marked
import _cli  # noqa: E402  (tests/_cli.py)

STAGES = ("ingest", "conversations", "validate", "data_report")
pytestmark = pytest.mark.server


def runs_of(home: Path) -> list:
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("finetune-pipeline")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def parents(home: Path) -> list:
    return [r for r in runs_of(home) if "pipeline.kind" in r.data.tags]


def leftovers(home: Path) -> list[Path]:
    return sorted(home.glob("outputs/*/.staging-*"))


def start_and_stop_mid_stage(tmp_path: Path, sig: int, in_import: bool = False,
                             group: bool = False) -> tuple[Path, list, object]:
    """Start the data flow from the command line on a new project home (so it starts its own
    temporary Prefect server); when the data_report stage has its staging folder, it waits
    there (tasks/runtime/pause.py) -- inside an import that turns the signal's exception into an
    ImportError, as a C extension's initialization does, if `in_import` -- and `sig` is sent to
    the flow process only, or with `group` to its whole process group, as a terminal's Ctrl-C
    (and `timeout`, `docker stop`, a CI runner's cancel) sends it. Returns (home, the processes
    it had started, the proc)."""
    home, marker = tmp_path / "home", tmp_path / "paused"
    env = {"PIPELINE_PAUSE_AT": f"data_report={marker}"}
    if in_import:
        env["PIPELINE_PAUSE_IMPORT"] = "tests._paused_import"
    proc = _cli.start("data", home=home, env=env, own_group=group)
    while not marker.exists():
        assert proc.poll() is None, _cli.output(proc)
        time.sleep(0.02)
    assert int(marker.read_text()) == proc.pid, "the stage runs in the flow process"
    assert leftovers(home), "paused with its staging folder"
    started = psutil.Process(proc.pid).children(recursive=True)
    assert any("uvicorn" in " ".join(p.cmdline()) for p in started), "a temporary server"
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    proc.wait(timeout=120)
    return home, started, proc


def test_kill_9_mid_stage_leaves_nothing_the_next_run_trusts(tmp_path, prefect_api_url):
    home, started, proc = start_and_stop_mid_stage(tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    _, alive = psutil.wait_procs(started, timeout=60)
    assert alive == [], "the temporary Prefect server (and the rest) stopped with the flow"
    assert leftovers(home), "the half-written stage output is still there before the re-run"
    killed = parents(home)[-1]
    assert killed.info.status == "RUNNING"

    # the next run on that home (reporting to a running server: what it must not trust is in
    # the home, and the killed run's temporary server is gone)
    again = _cli.run("data", home=home, api_url=prefect_api_url)
    assert again.returncode == 0, again.stderr
    assert leftovers(home) == []
    runs = {r.info.run_id: r for r in runs_of(home)}
    assert runs[killed.info.run_id].info.status == "KILLED"
    assert "its process (pid" in runs[killed.info.run_id].data.tags["pipeline.error"]
    assert "RUNNING" not in {r.info.status for r in runs.values()}
    assert parents(home)[-1].info.status == "FINISHED"
    # ingest..validate were published before the kill and are verified cache hits now
    kids = [r for r in runs_of(home) if r.data.tags.get("mlflow.parentRunId")
            == parents(home)[-1].info.run_id]
    assert {r.info.run_name: r.data.tags["pipeline.cache"] for r in kids} == {
        "ingest": "hit", "conversations": "hit", "validate": "hit", "data_report": "computed"}


@pytest.mark.parametrize("sig, code, in_import, group", [
    (signal.SIGTERM, -signal.SIGTERM, False, False), (signal.SIGTERM, -signal.SIGTERM, True, False),
    (signal.SIGINT, 130, False, False), (signal.SIGINT, 130, True, False),
    # to the whole group, the temporary Prefect server included: it must outlive the run's
    # report of its end (it has a session of its own), not die with the signal and leave the run
    # retrying a dead server for minutes
    (signal.SIGINT, 130, False, True), (signal.SIGTERM, -signal.SIGTERM, False, True)],
    ids=["SIGTERM-in-code", "SIGTERM-in-an-import", "Ctrl-C-in-code", "Ctrl-C-in-an-import",
         "Ctrl-C-to-the-group", "SIGTERM-to-the-group"])
def test_sigterm_and_ctrl_c_end_the_runs_as_killed(tmp_path, sig, code, in_import, group):
    home, started, proc = start_and_stop_mid_stage(tmp_path, sig, in_import, group)
    assert proc.returncode == code, _cli.output(proc)
    assert "Error logging to API" not in "".join(_cli.output(proc))
    _, alive = psutil.wait_procs(started, timeout=60)
    assert alive == []
    assert leftovers(home) == [], "the stage in flight cleaned up after itself"
    parent = parents(home)[-1]
    assert parent.info.status == "KILLED", parent.data.tags.get("pipeline.error")
    assert signal.Signals(sig).name in parent.data.tags["pipeline.error"]
    stage = next(r for r in runs_of(home) if r.info.run_name == "data_report")
    assert stage.info.status == "KILLED"
    assert "Traceback" not in "".join(_cli.output(proc))


def test_two_first_runs_at_once_on_a_new_home_both_succeed(tmp_path):
    home = tmp_path / "new-home"                      # does not exist yet
    procs = [_cli.start("data", home=home, out=tmp_path / f"run{i}") for i in range(2)]
    for p in procs:
        p.wait(timeout=600)
    for p in procs:
        out, err = _cli.output(p)
        assert p.returncode == 0 and "Traceback" not in out + err, err
    assert [r.info.status for r in parents(home)] == ["FINISHED"] * 2
    computed = [r for r in runs_of(home) if r.data.tags.get("pipeline.cache") == "computed"]
    assert sorted(r.info.run_name for r in computed) == sorted(STAGES), \
        "each stage computed once: the other run waited for it and found it in the cache"


# ---------------------------------------------------------------------------------------------
# Outputs changed on disk, results planted in the cache (in this process: faster)
# ---------------------------------------------------------------------------------------------
def children(parent_id: str) -> dict:
    client = MlflowClient(tracking_uri())
    exp = client.get_run(parent_id).info.experiment_id
    return {r.info.run_name: r for r in client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")}


def test_tampered_and_truncated_outputs_are_recomputed_with_everything_downstream(tmp_path):
    corpus = tmp_path / "qa.txt"
    shutil.copy(SAMPLE, corpus)
    first = data_pipeline(DataConfig(source=corpus))
    train = Path(first["files"]["train_json"])
    records = json.loads(train.read_text(encoding="utf-8"))
    assert len(records) == 239

    train.write_text(json.dumps(records[:10], ensure_ascii=False), encoding="utf-8")
    second = data_pipeline(DataConfig(source=corpus))
    kids = children(second["mlflow_run_id"])
    assert kids["ingest"].data.tags["pipeline.cache"] == "hit"
    for stage in ("conversations", "validate", "data_report"):
        assert kids[stage].data.tags["pipeline.cache"] == "invalidated", stage
    assert "train.json has" in kids["conversations"].data.tags["pipeline.cache_invalidated"]
    assert "upstream stage conversations" in \
        kids["validate"].data.tags["pipeline.cache_invalidated"]
    assert kids["validate"].data.metrics["train_valid_records"] == 239
    assert len(json.loads(train.read_text(encoding="utf-8"))) == 239, "the file is restored"

    text = train.read_text(encoding="utf-8")
    train.write_text(text[:len(text) // 2], encoding="utf-8")          # truncated
    third = data_pipeline(DataConfig(source=corpus))
    assert [r["invalidated"] is not None for r in third["stages"]] == [False, True, True, True]
    assert len(json.loads(train.read_text(encoding="utf-8"))) == 239

    i = text.index("浇水")                                            # same size, new bytes
    train.write_text(text[:i] + "施肥" + text[i + 2:], encoding="utf-8")
    fourth = data_pipeline(DataConfig(source=corpus))
    assert fourth["stages"][1]["invalidated"].endswith("(its content hash differs)")
    fifth = data_pipeline(DataConfig(source=corpus))
    assert [r["cached"] for r in fifth["stages"]] == [True] * 4
    assert {r.info.status for r in children(fifth["mlflow_run_id"]).values()} == {"FINISHED"}


def test_a_pickle_planted_in_the_result_cache_is_never_loaded(tmp_path):
    # a corpus of this test's own: its ingest record is the one this run writes (other tests
    # of the session may have cached the sample, under another file name)
    corpus = tmp_path / "qa.txt"
    corpus.write_text(first_answer_marked("（缓存）"), encoding="utf-8")
    keys = project_dir() / ".prefect" / "storage" / "cache-keys"
    before = set(keys.glob("ingest-*"))
    data_pipeline(DataConfig(source=corpus))
    marker = tmp_path / "pwned"
    planted = 0
    for key in set(keys.glob("ingest-*")) - before:
        record = json.loads(key.read_text(encoding="utf-8"))
        Path(record["storage_key"]).write_bytes(
            b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
        record["serializer"] = {"type": "pickle", "picklelib": "pickle"}
        key.write_text(json.dumps(record), encoding="utf-8")
        planted += 1
    assert planted
    again = data_pipeline(DataConfig(source=corpus))
    assert not marker.exists(), "the planted pickle was never unpickled"
    assert again["stages"][0]["cached"] is False, "the record was refused: ingest recomputed"
    assert [r["cached"] for r in again["stages"][1:]] == [True] * 3
    assert [r["cached"] for r in data_pipeline(DataConfig(source=corpus))["stages"]] == \
        [True] * 4, "the record was rewritten as JSON"
