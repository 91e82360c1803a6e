"""What a cache hit trusts, without a flow: published outputs match their manifest, staging
directories of dead processes are swept, stage results are read back as JSON only, and the
config reads paths and `--set` values as the user meant them (docs/design.md "Failure modes")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flows.results import CacheKeyStorage, StageResultSerializer, UntrustedRecord
from tasks.runtime.errors import ConfigError, DataError
from tasks.data.validate import Validated
from tasks.evaluate.report import Report
from tasks.runtime.results import StageName, StageResult, stage_root
from tasks.runtime.files import owner_tag, publish_dir, staging_dir, sweep_leftovers
from tasks.config.load import load_config, load_model
from tasks.evaluate.gate import GateConfig
from tasks.runtime.manifest import MANIFEST, check_manifest


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def publish(files: dict[str, str], stage: StageName = StageName.INGEST) -> Path:
    with staging_dir(stage_root(stage)) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text, encoding="utf-8")
        out, _ = publish_dir(tmp, stage_root(stage))
    return out


# ---------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------
def test_a_published_directory_is_checked_against_its_manifest():
    out = publish({"train.json": "[1, 2, 3]\n", "sub/dev.json": "[4]\n"})
    assert (out / MANIFEST).is_file() and check_manifest(out) is None
    os.utime(out / "train.json")                       # touched, same bytes: still valid
    assert check_manifest(out) is None

    (out / "train.json").write_text("[9, 2, 3]\n", encoding="utf-8")       # same size
    assert "train.json was modified after it was published" in check_manifest(out)
    (out / "train.json").write_text("[1]\n", encoding="utf-8")             # truncated
    assert "train.json has 4 bytes; 10 were published" in check_manifest(out)
    (out / "train.json").unlink()
    assert "train.json is missing" in check_manifest(out)


def test_added_files_and_a_lost_manifest_are_caught():
    out = publish({"a.txt": "a\n"})
    (out / "extra.bin").write_bytes(b"x")
    assert "extra.bin was added" in check_manifest(out)
    (out / "extra.bin").unlink()
    (out / MANIFEST).unlink()
    assert "has no .manifest.json" in check_manifest(out)


def test_publishing_again_replaces_a_damaged_copy_and_keeps_a_good_one():
    out = publish({"a.txt": "content\n"})
    (out / "a.txt").write_text("tampered\n", encoding="utf-8")
    again = publish({"a.txt": "content\n"})
    assert again == out and (out / "a.txt").read_text(encoding="utf-8") == "content\n"
    assert check_manifest(out) is None
    inode = (out / "a.txt").stat().st_ino
    publish({"a.txt": "content\n"})                     # intact: the old copy is kept
    assert (out / "a.txt").stat().st_ino == inode
    assert sorted(p.name for p in stage_root(StageName.INGEST).iterdir()) == [out.name]


def test_stage_result_problem_names_the_file():
    out = publish({"train.json": "[]\n"})
    result = StageResult(StageName.REPORT, str(out), out.name,
                         out=Report(report_md=out / "train.json", report_html=out / "train.json"))
    assert result.problem() is None
    (out / "train.json").write_text("[1, 2]\n", encoding="utf-8")
    assert str(out / "train.json") in result.problem()
    outside = StageResult("base", "/models/own", "x")      # a user's model: not ours to check
    assert outside.problem() is None


# ---------------------------------------------------------------------------------------------
# Staging directories of killed processes
# ---------------------------------------------------------------------------------------------
def test_sweep_removes_staging_dirs_of_dead_processes_only():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    tag = owner_tag(dead.pid)                 # taken while it runs (or just ended: no tag)
    dead.wait()
    root = stage_root(StageName.INGEST)
    mine = root / f".staging-{owner_tag()}-abc123"
    gone = root / f".staging-{tag}-def456"
    other_host = root / ".staging-1-1-00000000-ghi789"
    for d in (mine, gone, other_host):
        d.mkdir(parents=True)
        (d / "records.arrow").write_bytes(b"partial")
    assert sweep_leftovers() == [gone]
    assert mine.is_dir() and other_host.is_dir() and not gone.exists()


def test_a_failed_stage_leaves_no_staging_dir():
    with pytest.raises(RuntimeError):
        with staging_dir(stage_root(StageName.INGEST)) as tmp:
            (tmp / "half.json").write_text("[", encoding="utf-8")
            assert tmp.name.startswith(f".staging-{owner_tag()}-")
            raise RuntimeError("stage failed")
    assert list(stage_root(StageName.INGEST).iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Stage results: JSON only
# ---------------------------------------------------------------------------------------------
def _record(folder: Path, key: str, serializer: dict, result: bytes) -> Path:
    (folder / key).write_bytes(result)
    keys = folder / "cache-keys"
    keys.mkdir(exist_ok=True)
    (keys / key).write_text(json.dumps({"storage_key": str(folder / key), "expiration": None,
                                        "serializer": serializer, "prefect_version": "3",
                                        "storage_block_id": None}), encoding="utf-8")
    return keys / key


def test_stage_results_round_trip_as_json_and_nothing_else_is_read(tmp_path):
    result = StageResult("validate", "/p", "", out=Validated(
        valid_records={"train_valid_records": 3.0}, schemas={"train": "conversation.schema.json"},
        validated_by={"train": "jsonschema"}))
    blob = StageResultSerializer().dumps(result)
    assert StageResultSerializer().loads(blob) == result and b"validate" in blob
    record = json.loads(blob)["stage_result"]
    assert result.metrics == {"train_valid_records": 3.0}     # what MLflow logs, by field type
    assert result.info == {"schemas": {"train": "conversation.schema.json"},
                           "validated_by": {"train": "jsonschema"}}

    def refused(**changed):
        with pytest.raises(UntrustedRecord):
            StageResultSerializer().loads(json.dumps({"stage_result": {**record, **changed}})
                                          .encode())

    refused(extra=1)
    # the output's class must be a stage output of this project, its fields of their types
    refused(out={**record["out"], "type": "os:system"})
    refused(out={**record["out"], "type": "tasks.runtime.files:Path"})
    refused(out={**record["out"], "fields": {**record["out"]["fields"],
                                             "valid_records": {"train": "3"}}})
    refused(out={**record["out"], "fields": {"valid_records": {}}})
    # an output the cache could not store is refused where it is made, naming the field
    with pytest.raises(TypeError, match="report: output field 'report_md' is not JSON"):
        StageResult("report", "/p", "d", out=Report(report_md=object(), report_html=Path("/p")))
    with pytest.raises(TypeError):
        StageResultSerializer().dumps({"not": "a stage result"})

    storage = CacheKeyStorage(basepath=str(tmp_path / "cache-keys"), results_path=str(tmp_path))
    _record(tmp_path, "good", {"type": "stage-result-json"}, blob)
    assert json.loads(storage.read_path("good", _sync=True))["storage_key"].endswith("good")
    marker = tmp_path / "pwned"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."    # a pickle
    _record(tmp_path, "evil", {"type": "pickle", "picklelib": "pickle"}, payload)
    with pytest.raises(UntrustedRecord, match="names the serializer"):
        storage.read_path("evil", _sync=True)
    _record(tmp_path, "torn", {"type": "stage-result-json"}, blob[:20])
    with pytest.raises(UntrustedRecord):
        storage.read_path("torn", _sync=True)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# The config as the user meant it
# ---------------------------------------------------------------------------------------------
def test_set_values_are_literal_unless_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "q&a #1.txt"
    (tmp_path / name).write_text("问？\n答。\n", encoding="utf-8")
    cfg = load_config(None, [f"data.source={name}", "data.shuffle_seed=7",
                             "registry.model_name=2024", 'train.target_modules=["q_proj"]',
                             "data.system_prompt=# not a comment", "train.packing=true"])
    assert cfg.data.source == tmp_path / name                # relative: from the cwd
    assert (cfg.data.shuffle_seed, cfg.registry.model_name) == (7, "2024")
    assert cfg.train.target_modules == ["q_proj"] and cfg.train.packing is True
    assert cfg.data.system_prompt == "# not a comment"
    assert load_config(None, ["data.shuffle_seed=null"]).data.shuffle_seed is None
    assert load_model(GateConfig, ["metric=bleu_4"], "--gate").metric == "bleu_4"


def test_config_file_errors_name_the_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run.yaml"
    run.write_text("data:\n  shuffle_seed: 3\ntrain:\n  method: lora\n  epochs: lots\n",
                   encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run.yaml:5: train.epochs: Input should be a valid "):
        load_config(run)
    run.write_text("train:\n  method: [lora\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run.yaml:3: invalid YAML/JSON"):
        load_config(run)
    run.write_text("train:\n  epochs: 1\n  lora_rr: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(run)
    assert str(caught.value) == f"{run}:3: train.lora_rr: unknown field"
    assert caught.value.hint == "did you mean train.lora_r?"
    run.write_text("data:\n  source: missing.txt\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"run.yaml:2: data.source: no such file or "
                                          rf"directory: {tmp_path}/missing.txt"):
        load_config(run)
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"--set data.source=: data.source: is empty"):
        load_config(None, ["data.source="])


def test_unreadable_inputs_are_data_errors():
    """An unreadable file or folder is refused by name. Root reads everything, so the check
    runs in a forked child that gives up root first (the interpreter is already loaded)."""
    from tasks.data.ingest import ingest

    tmp_path = Path(tempfile.mkdtemp())             # /tmp/…: reachable by an unprivileged user
    os.chmod(tmp_path, 0o755)
    locked = tmp_path / "locked.txt"
    locked.write_text("问？\n答。\n\n问二？\n答二。\n", encoding="utf-8")
    folder = tmp_path / "data"
    (folder / "private").mkdir(parents=True)
    (folder / "a.txt").write_text("问？\n答。\n", encoding="utf-8")
    os.chmod(locked, 0)
    os.chmod(folder / "private", 0)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                                    # the child
        os.close(read)
        if os.geteuid() == 0:
            os.setgid(65534), os.setuid(65534)
        out = []
        for source in (locked, folder):
            try:
                ingest(source)
                out.append("no error")
            except DataError as e:
                out.append(str(e))
            except BaseException as e:
                out.append(f"{type(e).__name__}: {e}")
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        messages = json.loads(f.read())
    os.waitpid(pid, 0)
    shutil.rmtree(tmp_path)
    assert messages == [f"{locked}: cannot be read: Permission denied",
                        f"{folder / 'private'}: cannot be read: Permission denied"]
