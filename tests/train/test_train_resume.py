"""Stage "train": a real training process is killed mid-run and a re-run of the same inputs
resumes from its checkpoint (optimizer, scheduler, RNG and log history restored).

SIGKILL gives no warning: the run resumes from its last periodic checkpoint. SIGTERM is the
polite kill (preemption, `kill`, a cancelled flow run): the stage checkpoints the step in flight,
then dies of the signal, so nothing after the last optimizer step is lost."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tasks.runtime.paths import REPO_DIR
from tasks.runtime.files import read_json
from tasks.config import TrainConfig
from tasks.train.train import checkpoint_dir, last_checkpoint, train_adapter

CFG = TrainConfig(method="lora", epochs=8, batch_size=8, learning_rate=1e-2, lora_r=8,
                  lora_alpha=16, max_length=96, eval_steps=24, save_steps=8, save_total_limit=2)
TOTAL = 12 * 8                                              # 96 / 8 steps per epoch x 8
CHILD = ("import logging, sys, torch; torch.set_num_threads(1); from pathlib import Path; "
         "logging.basicConfig(level=logging.INFO, format='%(message)s'); "
         "from tasks.config import TrainConfig; from tasks.train.train import train_adapter; "
         "train_adapter(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), "
         "TrainConfig.model_validate_json(sys.argv[4]))")


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture
def data(tiny_base, tmp_path, monkeypatch) -> dict[str, Path]:
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    return tiny_base


@contextmanager
def _training_process(data, cfg: TrainConfig, env: dict[str, str] | None = None, **kwargs
                      ) -> Iterator[subprocess.Popen]:
    """The train stage in a child process of its own (the process that gets killed; `env`
    added to its environment); killed after 300 s at the latest, so a hung child fails the
    test, not the session."""
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(data["base"]), str(data["train"]),
                             str(data["dev"]), cfg.model_dump_json()], cwd=REPO_DIR, env=env,
                            **kwargs)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        yield proc
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()


def _resume_and_check(data, cfg: TrainConfig, killed_at: int, eval_loss_at_start: float):
    res = train_adapter(data["base"], data["train"], data["dev"], cfg)
    m, info, history = res.metrics, res.info, res.history
    assert info["resumed_from"] is not None and m["resumed_from_step"] >= killed_at
    assert m["global_step"] == TOTAL
    steps = [h["step"] for h in history if "loss" in h]
    assert min(steps) <= killed_at < max(steps) == TOTAL       # the curve spans the kill
    assert history[0] == {"step": 0, "eval_loss": round(eval_loss_at_start, 5)}
    assert m["eval_loss_after"] < m["eval_loss_before"]
    return res


def test_sigkilled_run_resumes_from_its_last_checkpoint(data, tmp_path):
    ckpt, marker = checkpoint_dir(data["base"], data["train"], data["dev"], CFG), \
        tmp_path / "paused"
    with _training_process(data, CFG, env={"PIPELINE_PAUSE_AT": f"train:checkpoint={marker}"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        while not marker.exists():              # it waits there after its first checkpoint
            assert proc.poll() is None, "training exited before its first checkpoint"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(Path(last_checkpoint(ckpt)).name.split("-")[1])
    assert killed_at == CFG.save_steps, "killed right after its first checkpoint"
    before = read_json(Path(last_checkpoint(ckpt)) / "trainer_state.json")["log_history"]
    assert [h["step"] for h in before if "eval_loss" in h] == [0]      # eval_on_start

    res = _resume_and_check(data, CFG, killed_at, before[0]["eval_loss"])
    names = [c["name"] for c in res.info["checkpoints"]]
    assert len(names) <= CFG.save_total_limit and names[-1] == f"checkpoint-{TOTAL}"
    assert res.metrics["checkpoints"] == len(names)
    assert all(Path(c["path"], "optimizer.pt").is_file() for c in res.info["checkpoints"])


def test_sigterm_checkpoints_the_step_in_flight_then_resumes(data):
    cfg = CFG.model_copy(update={"save_steps": 1000})   # no periodic checkpoint at all
    ckpt = checkpoint_dir(data["base"], data["train"], data["dev"], cfg)
    seen, lines = 0, []
    with _training_process(data, cfg, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True) as proc:
        for line in proc.stderr:                # the stage logs "step N/96 {...}" as it goes
            lines.append(line)
            if (match := re.match(r"step (\d+)/(\d+) ", line)):
                assert int(match[2]) == TOTAL
                seen = int(match[1])
                if seen >= 10:
                    proc.send_signal(signal.SIGTERM)
                    break
        lines += proc.stderr.readlines()
        proc.wait(timeout=60)
    assert seen >= 10, "".join(lines[-20:])
    assert proc.returncode == -signal.SIGTERM, "".join(lines[-20:])
    [saved] = [Path(c) for c in ckpt.glob("checkpoint-*")]
    stopped_at = int(saved.name.split("-")[1])
    assert seen <= stopped_at < TOTAL
    assert any(f"saving a checkpoint at step {stopped_at}" in line for line in lines)
    state = read_json(saved / "trainer_state.json")
    assert state["global_step"] == stopped_at and (saved / "optimizer.pt").is_file()
    published = Path(os.environ["PIPELINE_HOME"]) / "outputs" / "train"
    assert not published.exists() or not any(published.iterdir())   # no half-trained adapter

    res = _resume_and_check(data, cfg, stopped_at, state["log_history"][0]["eval_loss"])
    assert res.metrics["resumed_from_step"] == stopped_at      # not a step lost
