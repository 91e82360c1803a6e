"""Cache keys are content-addressed: input bytes, config, and the code closure of the stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import tasks.code_version as code_version
from flows.caching import stage_key
from tasks.code_version import code_closure
from tasks.common import StageResult
from tasks.config import DataConfig


def test_code_closure_follows_helper_modules():
    names = {p.name for p in code_closure("tasks.conversations")}
    assert names == {"conversations.py", "dataset_io.py", "common.py", "manifest.py",
                     "progress.py", "resources.py"}
    assert {"formats.py", "qa_text.py", "sources.py", "dataset_io.py", "common.py"} <= \
        {p.name for p in code_closure("tasks.ingest")}
    assert "formats.py" not in {p.name for p in code_closure("tasks.validate")}


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
    shutil.copytree(code_version.REPO_DIR / "tasks", tmp_path / "tasks")
    monkeypatch.setattr(code_version, "REPO_DIR", tmp_path)
    return tmp_path


def test_changed_helper_module_changes_dependent_keys_only(repo_copy):
    stages = ("tasks.ingest", "tasks.conversations", "tasks.validate", "tasks.data_report")
    before = {m: stage_key(m, {}) for m in stages}
    parser = repo_copy / "tasks" / "qa_text.py"               # a helper of ingest only
    src = parser.read_text(encoding="utf-8")
    parser.write_text(src + "\n# a comment is not a code change\n", encoding="utf-8")
    assert stage_key("tasks.ingest", {}) == before["tasks.ingest"]
    parser.write_text(src.replace("size != 2", "size < 2"), encoding="utf-8")
    assert stage_key("tasks.ingest", {}) != before["tasks.ingest"]
    assert all(stage_key(m, {}) == before[m] for m in stages if m != "tasks.ingest")
    io_py = repo_copy / "tasks" / "dataset_io.py"            # shared by every data stage
    io_py.write_text(io_py.read_text(encoding="utf-8").replace("_CHUNK = 1 << 16",
                                                              "_CHUNK = 1 << 15"))
    assert all(stage_key(m, {}) != k for m, k in before.items())
    common = repo_copy / "tasks" / "common.py"               # a shared helper changes all
    keys = {m: stage_key(m, {}) for m in stages}
    common.write_text(common.read_text(encoding="utf-8").replace(
        "LARGE_FILE_BYTES = 256 << 20", "LARGE_FILE_BYTES = 255 << 20"))
    assert all(stage_key(m, {}) != k for m, k in keys.items())


def test_key_of_a_directory_source_follows_its_files(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.jsonl").write_text('{"q": "Q", "a": "A"}\n', encoding="utf-8")
    key = stage_key("tasks.ingest", {"source": d})
    (d / "a.jsonl").touch()
    assert stage_key("tasks.ingest", {"source": d}) == key
    (d / "b.jsonl").write_text('{"q": "Q2", "a": "A2"}\n', encoding="utf-8")
    assert stage_key("tasks.ingest", {"source": d}) != key
