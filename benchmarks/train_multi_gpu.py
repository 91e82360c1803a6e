"""Train-stage throughput on 1 vs N GPUs (data-parallel through the stage's own torchrun launch).

The ~0.49 B random-weights Llama of benchmarks/models.py ("0.5b", sample tokenizer), the sample
train split repeated `--repeat` times, each method trained with `num_gpus=1` (in this process)
and `num_gpus=N` (train_adapter re-launches itself with torchrun). Reports useful (non-pad)
tokens/s and rank 0's peak CUDA memory. No Prefect/MLflow needed:

    python benchmarks/train_multi_gpu.py --out gpu-results --methods lora qlora --gpus 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.models import build_random_model
from tasks.runtime.paths import DATA_DIR
from tasks.runtime.files import atomic_write_json
from tasks.config import TrainConfig
from tasks.data.conversations import qa_to_conversation, split_train_dev
from tasks.data.qa_text import read_qa_text
from tasks.train.train import train_adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("gpu-results"))
    ap.add_argument("--methods", nargs="+", default=["lora", "qlora"])
    ap.add_argument("--gpus", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeat", type=int, default=8, help="copies of the train split")
    ap.add_argument("--batch-size", type=int, default=16, help="per device")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PIPELINE_HOME", str((args.out / "home").resolve()))

    pairs = read_qa_text(DATA_DIR / "sample" / "plant_care_qa.txt")
    train, dev = split_train_dev([qa_to_conversation(p["q"], p["a"]) for p in pairs])
    train_json = atomic_write_json(args.out / "train.json", train * args.repeat)
    dev_json = atomic_write_json(args.out / "dev.json", dev[:32])
    base_dir, params = build_random_model("0.5b", args.out / "home" / "big_base", "cuda")
    rows = []
    summary = {"device": torch.cuda.get_device_name(0), "gpus_visible": torch.cuda.device_count(),
               "torch": torch.__version__, "params": params, "train_examples": len(train) *
               args.repeat, "batch_size_per_device": args.batch_size, "rows": rows}
    for method in args.methods:
        for n in args.gpus:
            cfg = TrainConfig(method=method, num_gpus=n, epochs=1, batch_size=args.batch_size,
                              max_length=256, eval_steps=10_000, save_steps=10_000,
                              learning_rate=2e-4, compute_dtype="bfloat16", resume=False,
                              sanity_examples=0)
            t = time.perf_counter()
            r = train_adapter(base_dir, train_json, dev_json, cfg)
            m = r.metrics
            rows.append({"method": method, "gpus": n, "processes": m["num_processes"],
                         "tokens_per_s": round(m["train_tokens_per_s"], 1),
                         "train_seconds": m["train_seconds"], "steps": m["global_step"],
                         "peak_gib_rank0": round(m["peak_gpu_memory_gib"], 2),
                         "eval_loss": [round(m["eval_loss_before"], 3),
                                       round(m["eval_loss_after"], 3)],
                         "stage_seconds": round(time.perf_counter() - t, 1)})
            print(json.dumps(rows[-1]), flush=True)
            (args.out / "train_multi_gpu.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
