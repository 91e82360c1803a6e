"""Stage "train": a real training process is SIGKILLed after its first checkpoint, and a re-run
of the same inputs resumes from it (optimizer, scheduler, RNG and log history restored)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.base_model import build_base_model
from tasks.common import REPO_DIR, read_json
from tasks.config import BaseModelConfig, TrainConfig
from tasks.conversations import qa_to_conversation, split_train_dev
from tasks.qa_text import read_qa_text
from tasks.train import checkpoint_dir, last_checkpoint, train_adapter

SAMPLE = REPO_DIR / "data" / "sample" / "plant_care_qa.txt"
CFG = TrainConfig(method="lora", epochs=8, batch_size=8, learning_rate=1e-2, lora_r=8,
                  lora_alpha=16, max_length=96, eval_steps=24, save_steps=8, save_total_limit=2)
CHILD = ("import sys, torch; torch.set_num_threads(1); from pathlib import Path; "
         "from tasks.config import TrainConfig; from tasks.train import train_adapter; "
         "train_adapter(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), "
         "TrainConfig.model_validate_json(sys.argv[4]))")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def data(tmp_path, monkeypatch) -> dict[str, Path]:
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    convs = [qa_to_conversation(r["q"], r["a"]) for r in read_qa_text(SAMPLE)]
    train, dev = split_train_dev(convs, 0.7)
    paths = {"train": tmp_path / "train.json", "dev": tmp_path / "dev.json"}
    paths["train"].write_text(json.dumps(train[:96], ensure_ascii=False), encoding="utf-8")
    paths["dev"].write_text(json.dumps(dev[:16], ensure_ascii=False), encoding="utf-8")
    base = build_base_model(paths["train"], BaseModelConfig(
        vocab_size=300, hidden_size=64, num_layers=2, num_heads=2, max_seq_len=64,
        pretrain_epochs=2, learning_rate=5e-3))
    return {**paths, "base": Path(base.path), "home": tmp_path / "home"}


def test_killed_run_resumes_from_its_last_checkpoint(data):
    ckpt = checkpoint_dir(data["base"], data["train"], data["dev"], CFG)
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(data["base"]), str(data["train"]),
                             str(data["dev"]), CFG.model_dump_json()], cwd=REPO_DIR, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300     # imports are slow on a loaded box
        while last_checkpoint(ckpt) is None:
            assert proc.poll() is None, "training exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(Path(last_checkpoint(ckpt)).name.split("-")[1])
    total = 12 * 8                                            # 96 / 8 steps per epoch x 8
    assert 0 < killed_at < total
    before = read_json(Path(last_checkpoint(ckpt)) / "trainer_state.json")["log_history"]
    assert [h["step"] for h in before if "eval_loss" in h] == [0]      # eval_on_start

    res = train_adapter(data["base"], data["train"], data["dev"], CFG)
    m, info = res.metrics, res.info
    assert info["resumed_from"] is not None and m["resumed_from_step"] >= killed_at
    assert m["global_step"] == total
    steps = [h["step"] for h in info["log_history"] if "loss" in h]
    assert min(steps) <= killed_at < max(steps) == total       # curve spans the kill
    assert info["log_history"][0] == {"step": 0, "eval_loss": round(before[0]["eval_loss"], 5)}
    assert m["eval_loss_after"] < m["eval_loss_before"]
    names = [c["name"] for c in info["checkpoints"]]
    assert len(names) <= CFG.save_total_limit and names[-1] == f"checkpoint-{total}"
    assert m["checkpoints"] == len(names)
    assert all(Path(c["path"], "optimizer.pt").is_file() for c in info["checkpoints"])
