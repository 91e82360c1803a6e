"""What the MLflow and Prefect edges cost, checked for real: a cache hit logs nothing again
(no artifact file, no dataset), datasets are references read from the Parquet footer, outputs
are hard-linked into the artifact store (the user's own input is copied), input digests are
memoised by stat, and a command-line run starts its temporary server early, records its startup
and leaves no server behind, even when killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

import tasks.runtime.digest_memo as digest_memo
from flows.data import data_pipeline
from flows.mlflow_files import DatasetFile, dataset_input, mlflow_schema
from flows.tracking import tracking_uri
from tasks.runtime.paths import REPO_DIR, project_dir
from tasks.runtime.files import digest_file
from tasks.config import DataConfig
from tasks.data.dataset_io import CONVERSATIONS

SAMPLE = REPO_DIR / "data" / "sample" / "plant_care_qa.txt"
STAGES = ("ingest", "conversations", "validate", "data_report")


def own_corpus(tmp_path: Path) -> Path:
    """The sample plus one pair of this test's own, so no earlier test's cache serves it."""
    corpus = tmp_path / "qa.txt"
    corpus.write_text(SAMPLE.read_text(encoding="utf-8") + f"\n\n{tmp_path.name} 怎么办？\n"
                      f"{tmp_path.name} 的答案。\n", encoding="utf-8")
    return corpus


def artifact_files(client: MlflowClient) -> list[Path]:
    exp = client.get_experiment_by_name("finetune-pipeline")
    root = Path(url2pathname(urlparse(exp.artifact_location).path))
    return [p for p in root.rglob("*") if p.is_file()]


def count_rows(table: str) -> int:
    with sqlite3.connect(project_dir() / "mlflow.db") as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def children(client: MlflowClient, parent_id: str) -> dict:
    exp = client.get_run(parent_id).info.experiment_id
    return {r.info.run_name: r for r in client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")}


def flow_run(corpus: Path) -> tuple[MlflowClient, dict, dict]:
    """The data flow on `corpus`: (client, the flow's result, its child runs by stage)."""
    client = MlflowClient(tracking_uri())
    result = data_pipeline(DataConfig(source=corpus))
    return client, result, children(client, result["mlflow_run_id"])


# ---------------------------------------------------------------------------------------------
# The flow: what a computed stage and a cache hit log
# ---------------------------------------------------------------------------------------------
@pytest.mark.server
def test_cache_hit_logs_no_artifact_and_no_dataset_again(tmp_path):
    corpus = own_corpus(tmp_path)
    client, first, kids = flow_run(corpus)
    files, datasets = artifact_files(client), count_rows("datasets")

    hit = data_pipeline(DataConfig(source=corpus))
    assert [row["cached"] for row in hit["stages"]] == [True] * len(STAGES)
    assert artifact_files(client) == files, "a cache hit wrote artifact files"
    assert count_rows("datasets") == datasets, "a cache hit logged a dataset again"
    hit_kids = children(client, hit["mlflow_run_id"])
    for stage in STAGES:
        assert client.list_artifacts(hit_kids[stage].info.run_id) == []
        assert hit_kids[stage].data.tags["pipeline.reused_from_run_id"] == \
            kids[stage].info.run_id

    # the hit's dataset inputs are links to the very datasets the computed run logged:
    # references to the Parquet files (schema and row count from the footer), not records
    def inputs(run):
        return {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    logged, linked = inputs(kids["conversations"]), inputs(hit_kids["conversations"])
    assert set(linked) == {"training", "evaluation"}
    for context, ds in linked.items():
        assert (ds.name, ds.digest, ds.source) == (logged[context].name,
                                                   logged[context].digest,
                                                   logged[context].source)
    train = linked["training"]
    assert train.name == "train.parquet" and json.loads(train.source)["uri"] == \
        first["files"]["train_parquet"]
    assert json.loads(train.profile) == {"num_rows": 240}
    assert json.loads(train.schema)["mlflow_colspec"][0]["name"] == "conversations"
    assert json.loads(inputs(hit_kids["ingest"])["qa"].profile) == {"num_rows": 343}


@pytest.mark.server
def test_outputs_are_hard_linked_and_the_users_input_copied(tmp_path):
    corpus = own_corpus(tmp_path)
    client, result, kids = flow_run(corpus)

    def artifact(stage: str, name: str) -> Path:
        uri = kids[stage].info.artifact_uri
        return Path(url2pathname(urlparse(uri).path)) / name
    for name in ("train.parquet", "train.json", "dev.json"):
        logged, output = artifact("conversations", name), Path(result["files"][
            name.replace(".", "_")])
        assert logged.stat().st_ino == output.stat().st_ino, name
        assert logged.read_bytes() == output.read_bytes()
    raw = artifact("ingest", corpus.name)             # the user may edit it: a copy
    assert raw.read_bytes() == corpus.read_bytes()
    assert raw.stat().st_ino != corpus.stat().st_ino and corpus.stat().st_nlink == 1
    schemas = artifact("validate", "schemas/conversation.schema.json")
    assert schemas.stat().st_ino != (REPO_DIR / "schemas/conversation.schema.json").stat().st_ino


# ---------------------------------------------------------------------------------------------
# Dataset references and the digest memo, without a flow
# ---------------------------------------------------------------------------------------------
def test_dataset_reference_reads_only_the_parquet_footer(tmp_path):
    path = tmp_path / "train.parquet"
    table = pa.table({"conversations": pa.array(
        [[{"role": "user", "content": f"问{i}" * 50}, {"role": "assistant", "content": "答"}]
         for i in range(2000)], CONVERSATIONS.field("conversations").type)})
    pq.write_table(table, path, compression="none")
    size = path.stat().st_size
    footer = int.from_bytes(path.read_bytes()[-8:-4], "little") + 8
    with open(path, "r+b") as f:                      # wreck every data page, keep the footer
        f.seek(4)
        f.write(b"\xff" * (size - footer - 4))
    with pytest.raises(Exception):
        pq.read_table(path)                          # the records are unreadable now ...
    ds = dataset_input("training", DatasetFile(path), "d" * 32).dataset   # ... and not needed
    assert (ds.name, ds.digest, json.loads(ds.profile)) == ("train.parquet", "d" * 32,
                                                            {"num_rows": 2000})
    assert json.loads(ds.source) == {"uri": str(path)} and ds.source_type == "local"
    assert json.loads(ds.schema)["mlflow_colspec"] == mlflow_schema(CONVERSATIONS).to_dict()
    assert mlflow_schema(CONVERSATIONS).to_dict()[0]["type"] == "array"


def test_digest_memo_follows_the_stat(tmp_path, monkeypatch):
    monkeypatch.setattr(digest_memo, "RACY_SECONDS", 0.0)
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    data = tmp_path / "big.txt"
    data.write_bytes(b"0123456789" * 1000)
    assert digest_memo.memo_digest_file(data) == digest_file(data)
    [memo] = digest_memo.memo_dir().glob("*.json")
    entry = json.loads(memo.read_text())
    memo.write_text(json.dumps({**entry, "digest": "remembered"}))
    assert digest_memo.memo_digest_file(data) == "remembered"      # unchanged: not read again

    os.utime(data)                                   # touched: read again, same digest
    assert digest_memo.memo_digest_file(data) == digest_file(data)
    memo.write_text(json.dumps({**json.loads(memo.read_text()), "digest": "remembered"}))
    st = data.stat()                                 # same size, mtime put back: ctime tells
    data.write_bytes(b"9876543210" * 1000)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert digest_memo.memo_digest_file(data) == digest_file(data) != "remembered"
    memo.write_text(json.dumps({**json.loads(memo.read_text()), "digest": "remembered"}))
    other = tmp_path / "other.txt"                   # another file moved into its place
    other.write_bytes(b"9876543210" * 1000)
    os.replace(other, data)
    assert digest_memo.memo_digest_file(data) == digest_file(data)
    memo.write_text("not json")                      # a corrupt memo costs a re-read only
    assert digest_memo.memo_digest_file(data) == digest_file(data)


def test_a_digest_taken_right_after_a_change_is_not_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    data = tmp_path / "fresh.txt"
    data.write_bytes(b"just written")
    assert digest_memo.memo_digest_file(data) == digest_file(data)
    assert not digest_memo.memo_dir().exists() or not any(digest_memo.memo_dir().iterdir())


def test_memo_digest_of_a_directory_equals_the_plain_digest(tmp_path, monkeypatch):
    from tasks.runtime.files import digest_path

    monkeypatch.setattr(digest_memo, "RACY_SECONDS", 0.0)
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.json").write_text("[]")
    (tmp_path / "d" / "sub" / "b.txt").write_text("问\n答\n")
    for _ in range(2):                               # computed, then remembered
        assert digest_memo.memo_digest_path(tmp_path / "d") == digest_path(tmp_path / "d")


# ---------------------------------------------------------------------------------------------
# The command line: an early temporary server, startup on record, nothing left behind
# ---------------------------------------------------------------------------------------------
def _cli(home: Path, corpus: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return subprocess.Popen([sys.executable, "-m", "flows.data", "--set", f"source={corpus}"],
                            cwd=REPO_DIR, env={**env, "PIPELINE_HOME": str(home)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _servers(cli: psutil.Process) -> list[psutil.Process]:
    return [p for p in cli.children(recursive=True)
            if "prefect.server.api.server:create_app" in " ".join(p.cmdline())]


@pytest.mark.server
def test_cli_run_records_its_startup_and_stops_its_server(tmp_path):
    home, corpus = tmp_path / "home", own_corpus(tmp_path)
    home.mkdir()
    cli = _cli(home, corpus)
    proc, seen = psutil.Process(cli.pid), []
    while cli.poll() is None and not seen:            # launched at once, before any stage
        seen = _servers(proc)
        time.sleep(0.05)
    out, _ = cli.communicate(timeout=300)
    assert cli.returncode == 0, out[-3000:]
    assert seen and not any(s.is_running() and s.status() != psutil.STATUS_ZOMBIE
                            for s in seen), "the temporary server outlived the run"
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("finetune-pipeline")
    [run] = client.search_runs([exp.experiment_id], "tags.`pipeline.kind` = 'data'")
    m = run.data.metrics
    assert 0 < m["server_wait_seconds"] <= m["server_start_seconds"] < m["startup_seconds"]
    assert {f"stage_total_seconds.{s}" for s in STAGES} <= set(m)
    assert run.data.tags["prefect.flow_run_url"] == ""  # that server is gone after the run


@pytest.mark.server
def test_killed_cli_run_takes_its_server_with_it(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    cli = _cli(home, own_corpus(tmp_path))
    proc, servers = psutil.Process(cli.pid), []
    deadline = time.monotonic() + 120
    while not servers and time.monotonic() < deadline:
        servers = _servers(proc)
        time.sleep(0.05)
    assert servers, "no temporary server was started"
    os.kill(cli.pid, signal.SIGKILL)
    cli.communicate()
    gone, alive = psutil.wait_procs(servers, timeout=30)
    assert not alive, f"server {alive} outlived the killed run"
    shutil.rmtree(home, ignore_errors=True)


def test_prefect_settings_files_that_name_a_server_keep_the_choice(tmp_path, monkeypatch):
    from flows.ops.startup import api_url_configured

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    (tmp_path / "pyproject.toml").write_text("[tool.setuptools]\npackages = []\n")
    assert not api_url_configured()
    (tmp_path / "prefect.toml").write_text('[api]\nurl = "http://prefect.internal:4200/api"\n')
    assert api_url_configured()
    (tmp_path / "prefect.toml").unlink()
    (tmp_path / "prefect-home").mkdir()
    (tmp_path / "prefect-home" / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://prefect.internal:4200/api"\n')
    assert api_url_configured()
