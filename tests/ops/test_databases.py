"""A new project home's Prefect and MLflow databases come from templates (flows/ops/databases.py):
the copies open at their schema's head, a home's own database is never replaced, concurrent
first runs publish one copy, and without a usable cache the databases are made the slow way."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.ops import databases


def alembic_head(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def test_a_new_home_gets_both_databases_at_their_head(tmp_path):
    home = tmp_path / "home"
    assert databases.seed("prefect", home / ".prefect" / "prefect.db")
    assert databases.seed_mlflow(f"sqlite:///{home / 'mlflow.db'}")
    for kind, db in (("prefect", home / ".prefect" / "prefect.db"), ("mlflow", home / "mlflow.db")):
        template = databases.template(kind)
        assert db.read_bytes() == template.read_bytes()
        assert alembic_head(db) == alembic_head(template)
    # MLflow opens it without a migration and makes its default experiment for this home
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    assert client.get_experiment("0").name == "Default"
    exp = client.create_experiment("e", (home / "mlruns").as_uri())
    assert client.get_experiment(exp).artifact_location == (home / "mlruns").as_uri()


def test_a_runs_tracker_on_a_new_home_opens_the_copy(tmp_path, monkeypatch):
    """The copy is made before MLflow opens (and so would create) the store: a template with a
    mark of its own is what the new home's database holds."""
    from flows.tracking import Tracker

    template = databases.template("mlflow")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    marked = databases.template_path("mlflow")
    marked.parent.mkdir(parents=True)
    marked.write_bytes(template.read_bytes())
    with sqlite3.connect(marked) as conn:
        conn.execute("CREATE TABLE made_from_the_template (x)")
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    tracker = Tracker("finetune-pipeline")
    assert tracker.client.get_experiment(tracker.experiment_id).name == "finetune-pipeline"
    with sqlite3.connect(tmp_path / "home" / "mlflow.db") as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = "
                            "'made_from_the_template'").fetchone()


def test_runs_on_two_homes_in_one_process_track_into_their_own_stores(tmp_path, monkeypatch):
    """MLflow exports the URI it is set to as `MLFLOW_TRACKING_URI`; the tracker leaves the
    environment as it was, so a later run on another home does not take that for the user's
    setting. A user's own setting is still followed."""
    from flows.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("one", "two"):
        monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / name))
        assert Tracker("finetune-pipeline").uri == f"sqlite:///{tmp_path / name / 'mlflow.db'}"
        assert "MLFLOW_TRACKING_URI" not in os.environ
    users = f"sqlite:///{tmp_path / 'users.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", users)
    assert Tracker("finetune-pipeline").uri == users
    assert os.environ["MLFLOW_TRACKING_URI"] == users


def test_an_existing_database_is_left_alone(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"the user's own")
    assert not databases.seed_mlflow(f"sqlite:///{db}")
    assert db.read_bytes() == b"the user's own"
    assert not databases.seed_mlflow("http://127.0.0.1:5000")      # a server's: not ours
    assert list(tmp_path.iterdir()) == [db]


def test_two_first_runs_at_once_publish_one_copy(tmp_path):
    target = tmp_path / "home" / "mlflow.db"
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(databases.seed("mlflow", target)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert [p.name for p in target.parent.iterdir()] == ["mlflow.db"], "no temp file left"


def test_without_a_usable_cache_nothing_is_copied(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("not a folder")
    assert not databases.seed("mlflow", tmp_path / "home" / "mlflow.db")
    assert not (tmp_path / "home" / "mlflow.db").exists()


def test_a_template_that_failed_once_is_not_tried_again(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(databases._MAKE, "mlflow", ("mlflow.db", ["-c", "raise SystemExit(3)"]))
    assert not databases.seed("mlflow", tmp_path / "home" / "mlflow.db")
    failed = list((tmp_path / "cache" / "finetune-pipeline").glob("mlflow-*.failed"))
    assert len(failed) == 1 and "exit status 3" in failed[0].read_text(encoding="utf-8")
    monkeypatch.setitem(databases._MAKE, "mlflow", ("mlflow.db", ["-c", "raise SystemExit(0)"]))
    assert not databases.seed("mlflow", tmp_path / "home" / "mlflow.db")   # not tried again
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("kind", ["prefect", "mlflow"])
def test_the_template_is_one_self_contained_checked_file(kind):
    template = databases.template(kind)
    assert template.name.startswith(f"{kind}-") and template.stat().st_size > 100_000
    assert not template.with_name(template.name + "-wal").exists()
    with sqlite3.connect(template) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        if kind == "mlflow":      # the default experiment is made where the copy is opened
            assert conn.execute("SELECT COUNT(*) FROM experiments").fetchone()[0] == 0
        else:                     # servers started together on a copy find the blocks there
            assert conn.execute("SELECT COUNT(*) FROM block_type").fetchone()[0] > 10
