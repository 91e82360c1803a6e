"""`make serve` (flows/serve.py): MLflow's own model server answers an OpenAI-style chat request
for the registry's @champion, over real HTTP, and follows the alias to a newly promoted version
(README "Where to look")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import psutil
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from flows.ops.stack import free_port
from flows.tracking import Tracker
from tasks.runtime.paths import REPO_DIR
from tasks.export.merge import merge_adapter
from flows.registry import log_chat_model, register_version
from tests._tiny_model import make_adapter, make_base

pytestmark = pytest.mark.server
MODEL = "serve-chat"


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> list[tuple[str, str]]:
    """Two registered MLflow models (tiny merged models of two adapters): (version, folder)."""
    root = tmp_path_factory.mktemp("serve")
    base = make_base(root / "base")
    tracker = Tracker("serve-test")
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    out = []
    for seed in (1, 2):
        merged = merge_adapter(base, make_adapter(base, root / f"adapter{seed}", seed=seed))
        v = register_version(tracker.client, MODEL, run_id=run_id, digest=merged.digest, tags={},
                             source=partial(log_chat_model, merged.path, run_id,
                                            quantized=False))
        out.append((v.version, merged.path))
    return out


def _answer(port: int, served_folder: str, proc: subprocess.Popen,
            timeout: float = 240) -> dict:
    """POST a chat request until the server answers from `served_folder` (or time out, or
    `make serve` exits)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=60, json={
                "messages": [{"role": "user", "content": "绿萝叶子发黄是什么原因？"}],
                "max_tokens": 8})
            last = r.json() if r.status_code == 200 else r.text
            if r.status_code == 200 and last[0]["model"] == served_folder:
                return last[0]
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    log = proc.communicate(timeout=60)[0] if proc.poll() is not None else "(still running)"
    pytest.fail(f"no answer from {served_folder} within {timeout:.0f} s; last: {last}; "
                f"flows.serve output:\n{log[-3000:]}")


def test_the_served_champion_answers_and_follows_a_promotion(versions):
    client = MlflowClient(Tracker("serve-test").uri)
    (v1, folder1), (v2, folder2) = versions
    assert v1 != v2 and folder1 != folder2
    client.set_registered_model_alias(MODEL, "champion", v1)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--model", MODEL, "--port",
                             str(port), "--poll", "1"], cwd=REPO_DIR, env={**os.environ},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree: list[psutil.Process] = []
    log = ""
    try:
        first = _answer(port, folder1, proc)
        message = first["choices"][0]["message"]
        assert message["role"] == "assistant" and message["content"].strip()
        assert first["object"] == "chat.completion" and first["usage"]["completion_tokens"] > 0
        tree = psutil.Process(proc.pid).children(recursive=True)
        client.set_registered_model_alias(MODEL, "champion", v2)      # the gate promotes v2
        assert _answer(port, folder2, proc)["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=60)
    assert f"serving {MODEL} v{v1}" in log and f"serving {MODEL} v{v2}" in log
    assert f"@champion moved: {MODEL} v{v1} -> v{v2}" in log
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"model server processes outlived make serve: {alive}"


def test_a_named_version_is_served_whatever_the_alias_says(versions):
    client = MlflowClient(Tracker("serve-test").uri)
    (v1, folder1), (v2, _) = versions
    client.set_registered_model_alias(MODEL, "champion", v2)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--model", MODEL, "--version",
                             str(v1), "--port", str(port), "--poll", "1"], cwd=REPO_DIR,
                            env={**os.environ}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert _answer(port, folder1, proc)["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=60)
    assert f"serving {MODEL} v{v1}" in log and "moved" not in log


def test_without_a_champion_make_serve_says_once_what_to_run(versions):
    """No alias on the model: one line naming its versions and the command, printed once
    however many polls pass; an unknown model: run `make run` first."""
    outputs = []
    for model in (MODEL, "never-registered"):
        proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--model", model,
                                 "--alias", "no-such-alias", "--poll", "0.2"], cwd=REPO_DIR,
                                env={**os.environ}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        watchdog = threading.Timer(120, proc.kill)     # a hung process fails this test only
        watchdog.start()
        first = proc.stdout.readline()                 # imported, connected, first poll done
        time.sleep(3)                                  # 15 more polls
        proc.send_signal(signal.SIGTERM)
        outputs.append(first + proc.communicate(timeout=60)[0])
        watchdog.cancel()
        assert proc.returncode == 0, outputs[-1][-2000:]      # SIGTERM: a clean stop
    mine = [line for line in outputs[0].splitlines() if "none is @no-such-alias" in line]
    assert len(mine) == 1 and "versions 1, 2" in mine[0], outputs[0][-2000:]
    assert 'make serve ARGS="--version 2"' in mine[0]
    assert outputs[1].count("no version of never-registered is registered yet: run "
                            "`make run`") == 1, outputs[1][-2000:]


def test_a_model_is_logged_into_its_runs_experiment(tmp_path, monkeypatch):
    """A DB the stack's MLflow server made has a "Default" experiment under `mlflow-artifacts:`
    that only an http client can write to; a model logged from a sqlite client (the stack's
    worker) must land in its run's experiment, not there."""
    import sqlite3

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path))
    tracker = Tracker("finetune-pipeline")
    with sqlite3.connect(tmp_path / "mlflow.db") as db:           # as `mlflow server` makes it
        db.execute("update experiments set artifact_location = 'mlflow-artifacts:/0' "
                   "where experiment_id = 0")
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    uri = log_chat_model(str(make_base(tmp_path / "base")), run_id, quantized=False)
    model = tracker.client.get_logged_model(uri.removeprefix("models:/"))
    assert model.experiment_id == tracker.experiment_id and model.source_run_id == run_id
    assert model.artifact_location.startswith((tmp_path / "mlruns").as_uri())
    assert model.status == LoggedModelStatus.READY
    card = Path(model.artifact_location.removeprefix("file://")) / "model_card_data.yaml"
    assert "license: unknown" in card.read_text(), "no Hub lookup for a local model's card"


def test_a_registered_model_is_not_a_second_copy_of_its_weights(versions):
    """The logged model's weight files are the merge stage's published files (hard links):
    registering a 12 GB model costs no second 12 GB (docs/design.md "Disk")."""
    client = MlflowClient(Tracker("serve-test").uri)
    for version, folder in versions:
        mv = client.get_model_version(MODEL, version)
        logged = client.get_logged_model(mv.source.removeprefix("models:/"))
        root = Path(logged.artifact_location.removeprefix("file://"))
        weights = sorted(Path(folder).glob("*.safetensors"))
        assert weights
        for w in weights:
            stored = root / "model" / w.name
            assert stored.stat().st_ino == w.stat().st_ino and w.stat().st_nlink >= 2
