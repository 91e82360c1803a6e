"""SIGTERM under multi-GPU training: the train stage, launched on 2+ GPUs (it relaunches itself
through torchrun, DDP), gets SIGTERM in its launching process mid-run -- as a cancelled flow run
or a preempted node would. The signal must reach every rank, the ranks must checkpoint the same
step and exit, nothing may be left running, and a re-run must resume from that step.

    PYTHONPATH=. python benchmarks/ddp_sigterm.py --out results/      # on a machine with 2+ GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tasks.train.base_model import build_base_model
from tasks.runtime.paths import DATA_DIR, REPO_DIR
from tasks.runtime.files import atomic_write_json, read_json
from tasks.config import BaseModelConfig, TrainConfig
from tasks.data.conversations import qa_to_conversation, split_train_dev
from tasks.data.qa_text import read_qa_text
from tasks.train.train import checkpoint_dir, train_adapter

CHILD = ("import logging, sys; from pathlib import Path; "
         "logging.basicConfig(level=logging.INFO, format='%(message)s'); "
         "from tasks.config import TrainConfig; from tasks.train.train import train_adapter; "
         "train_adapter(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), "
         "TrainConfig.model_validate_json(sys.argv[4]))")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("ddp-sigterm"))
    ap.add_argument("--after-step", type=int, default=10)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PIPELINE_HOME", str(args.out.resolve() / "home"))

    pairs = read_qa_text(DATA_DIR / "sample" / "plant_care_qa.txt")
    train, dev = split_train_dev([qa_to_conversation(p["q"], p["a"]) for p in pairs])
    train_json = atomic_write_json(args.out / "train.json", train)
    dev_json = atomic_write_json(args.out / "dev.json", dev)
    base = build_base_model(train_json, BaseModelConfig(pretrain_epochs=1)).path
    cfg = TrainConfig(method="lora", epochs=20, batch_size=8, max_length=128,
                      eval_steps=10_000, save_steps=10_000)      # no periodic checkpoint
    ckpt = checkpoint_dir(base, train_json, dev_json, cfg)

    env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, base, str(train_json),
                             str(dev_json), cfg.model_dump_json()], cwd=REPO_DIR, env=env,
                            stderr=subprocess.PIPE, text=True)
    lines, seen, total = [], 0, 0
    for line in proc.stderr:
        lines.append(line)
        if (m := re.match(r"step (\d+)/(\d+) ", line)):
            seen, total = int(m[1]), int(m[2])
            if seen >= args.after_step:
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)        # the launcher only, not the ranks
                break
    lines += proc.stderr.readlines()
    proc.wait(timeout=120)
    stop_seconds = time.monotonic() - t0
    time.sleep(2)
    left = subprocess.run(["pgrep", "-f", "tasks.train.train --worker"], capture_output=True,
                          text=True).stdout.split()
    saved = sorted(ckpt.glob("checkpoint-*"))
    stopped_at = int(saved[-1].name.split("-")[1]) if saved else None
    acks = [ln.strip() for ln in lines if "SIGTERM: saving a checkpoint" in ln]

    res = train_adapter(base, train_json, dev_json, cfg)
    summary = {
        "gpus": int(res.metrics["num_processes"]), "signalled_after_step": seen,
        "total_steps": total, "launcher_exit": proc.returncode,
        "seconds_to_exit": round(stop_seconds, 1), "workers_left": left,
        "checkpoints_after_stop": [p.name for p in saved], "rank_messages": acks,
        "state_step": read_json(saved[-1] / "trainer_state.json")["global_step"]
        if saved else None,
        "resumed_from_step": res.metrics["resumed_from_step"],
        "global_step_after_resume": res.metrics["global_step"],
        "eval_loss": [res.out.eval_loss_before, res.out.eval_loss_after]}
    summary["ok"] = (proc.returncode == -signal.SIGTERM and not left and stopped_at is not None
                     and seen <= stopped_at < total and len(acks) == summary["gpus"]
                     and summary["resumed_from_step"] == stopped_at
                     and summary["global_step_after_resume"] == total)
    (args.out / "ddp_sigterm.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    if not summary["ok"]:
        print("".join(lines[-40:]))
        sys.exit(1)


if __name__ == "__main__":
    main()
