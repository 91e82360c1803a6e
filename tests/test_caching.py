"""Cache keys are content-addressed: input bytes, config, and the code closure of the stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import flows.caching as caching
from flows.caching import code_closure, stage_key
from tasks.common import StageResult
from tasks.config import DataConfig


def test_code_closure_follows_helper_modules():
    names = {p.name for p in code_closure("tasks.conversations")}
    assert names == {"conversations.py", "common.py"}
    assert "common.py" in {p.name for p in code_closure("tasks.ingest")}


def test_key_follows_file_content_not_path_or_mtime(tmp_path):
    f = tmp_path / "qa.txt"
    f.write_text("Q\nA\n", encoding="utf-8")
    key = stage_key("tasks.ingest", {"source": f})
    f.touch()                                             # touched, unchanged: same key
    assert stage_key("tasks.ingest", {"source": f}) == key
    g = tmp_path / "copy.txt"
    shutil.copy(f, g)                                     # same bytes elsewhere: same key
    assert stage_key("tasks.ingest", {"source": g}) == key
    f.write_text("Q\nA changed\n", encoding="utf-8")
    assert stage_key("tasks.ingest", {"source": f}) != key


def test_key_follows_config_and_upstream_digest():
    r1 = StageResult(stage="ingest", path="/x/a", digest="a")
    r2 = StageResult(stage="ingest", path="/x/a", digest="b")
    base = {"qa": r1, "cfg": DataConfig()}
    key = stage_key("tasks.conversations", base)
    assert stage_key("tasks.conversations", {**base, "qa": r2}) != key
    assert stage_key("tasks.conversations", {**base, "cfg": DataConfig(train_ratio=0.8)}) != key
    # a re-execution mints a new result_id but the same digest: downstream keys are unchanged
    assert stage_key("tasks.conversations", {**base, "qa": StageResult("ingest", "/x/a", "a")}) \
        == key


@pytest.fixture
def repo_copy(tmp_path, monkeypatch) -> Path:
    shutil.copytree(caching.REPO_DIR / "tasks", tmp_path / "tasks")
    monkeypatch.setattr(caching, "REPO_DIR", tmp_path)
    return tmp_path


def test_changed_helper_module_changes_dependent_keys_only(repo_copy):
    before = {m: stage_key(m, {}) for m in ("tasks.ingest", "tasks.conversations",
                                            "tasks.validate")}
    ingest_py = repo_copy / "tasks" / "ingest.py"
    src = ingest_py.read_text(encoding="utf-8")
    ingest_py.write_text(src + "\n# a comment is not a code change\n", encoding="utf-8")
    assert stage_key("tasks.ingest", {}) == before["tasks.ingest"]
    ingest_py.write_text(src.replace('line = line.strip()', 'line = line.rstrip()'),
                         encoding="utf-8")
    assert stage_key("tasks.ingest", {}) != before["tasks.ingest"]
    assert stage_key("tasks.conversations", {}) == before["tasks.conversations"]
    common = repo_copy / "tasks" / "common.py"               # a shared helper changes all
    common.write_text(common.read_text(encoding="utf-8").replace("_CHUNK = 1 << 20",
                                                                 "_CHUNK = 1 << 19"))
    assert all(stage_key(m, {}) != k for m, k in before.items() if m != "tasks.ingest")
