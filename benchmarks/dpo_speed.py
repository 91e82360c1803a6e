"""QLoRA-DPO speed at a real size: the preference stage (tasks/train/preference.py) beside a bare
TRL `DPOTrainer` script -- the one TRL's documentation leads a user to write -- on the same
4-bit model, pairs, LoRA and batch settings, each variant in a fresh process, in one run.

    PYTHONPATH=. python benchmarks/dpo_speed.py                  # 6 B (benchmarks/models.py)
    PYTHONPATH=. python benchmarks/dpo_speed.py --size tiny      # a smoke run on a CPU

Variants: `trl` (bare DPOTrainer, TRL's defaults: gradient checkpointing on), `trl_liger` (the
same with `use_liger_kernel=True`), `stage` (the preference stage with its defaults) and
`stage_no_gc` (the stage without gradient checkpointing). Figures per variant: useful tokens/s
(TRL's `num_tokens`, padding left out, over the training loop's own time, evaluation left out),
peak CUDA memory (allocated) and peak host RSS. Writes
benchmarks/results/dpo_speed_<size>.json and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("trl", "stage", "trl_liger", "stage_no_gc")
#: the settings both sides share (a QLoRA-DPO recipe at 6 B on one GPU)
LORA_R, LORA_ALPHA, BATCH, MAX_LENGTH, LEARNING_RATE, BETA = 16, 32, 8, 160, 5e-6, 0.1


def bare_trl(model_dir: str, train_json: str, liger: bool, epochs: float) -> dict:
    """The bare script: load in 4 bits, LoRA on every linear layer, DPOTrainer's defaults."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant,
                                                 dtype=torch.bfloat16,
                                                 device_map="cuda" if gpu else "cpu")
    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs = json.loads(Path(train_json).read_text(encoding="utf-8"))
    data = Dataset.from_list([{"prompt": p["prompt"],
                               "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]}
                              for p in pairs])
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH,
                     num_train_epochs=epochs, learning_rate=LEARNING_RATE, beta=BETA,
                     max_length=MAX_LENGTH, bf16=gpu, use_cpu=not gpu, logging_steps=1,
                     save_strategy="no", report_to="none", use_liger_kernel=liger)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=lora)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h][-1]
    return {"tokens": tokens, "train_loop_s": seconds, "steps": trainer.state.global_step,
            "gradient_checkpointing": args.gradient_checkpointing, "liger": liger,
            "group_by_length": False,
            "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0}


def stage(model_dir: str, train_json: str, dev_json: str, gc: bool | None,
          epochs: float) -> dict:
    """The preference stage's core, as the flow runs it (QLoRA-DPO)."""
    from tasks.config import PreferenceConfig
    from tasks.train.preference import tune_preferences, use_liger

    cfg = PreferenceConfig(method="dpo", quantized=True, epochs=epochs, batch_size=BATCH,
                           learning_rate=LEARNING_RATE, beta=BETA, max_length=MAX_LENGTH,
                           lora_r=LORA_R, lora_alpha=LORA_ALPHA, gradient_checkpointing=gc,
                           eval_steps=10_000, save_steps=10_000, resume=False)
    result = tune_preferences(model_dir, Path(train_json), Path(dev_json), cfg)
    m = result.metrics
    import torch

    gpu = torch.cuda.is_available()
    return {"tokens": m["train_tokens"], "train_loop_s": m["train_tokens"] /
            m["train_tokens_per_s"], "steps": int(m["global_step"]),
            "gradient_checkpointing": gpu if gc is None else gc,
            "liger": use_liger(cfg, "cuda" if gpu else "cpu"), "group_by_length": True,
            "peak_cuda_gib": m["peak_gpu_memory_gib"]}


def run_variant(args: argparse.Namespace) -> int:
    """One variant in this (fresh) process; its figures as one JSON line on stdout."""
    if args.variant.startswith("trl"):
        out = bare_trl(args.model, args.train, args.variant == "trl_liger", args.epochs)
    else:
        out = stage(args.model, args.train, args.dev,
                    False if args.variant == "stage_no_gc" else None, args.epochs)
    out["tokens_per_s"] = out["tokens"] / out["train_loop_s"]
    from tasks.runtime.resources import own_peak_rss_mib

    out["peak_rss_mib"] = own_peak_rss_mib()       # not the parent's, as ru_maxrss would be
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def write(args: argparse.Namespace, gpu: bool, pairs, rows: dict[str, dict]) -> Path:
    """benchmarks/results/dpo_speed_<size>.json of the variants run so far."""
    import torch

    anchor = rows.get("trl", {})
    for row in rows.values():
        if "tokens_per_s" in row and "tokens_per_s" in anchor:
            row["speed_vs_trl"] = row["tokens_per_s"] / anchor["tokens_per_s"]
            if anchor.get("peak_cuda_gib"):
                row["memory_vs_trl"] = row["peak_cuda_gib"] / anchor["peak_cuda_gib"]
    result = {"date": datetime.date.today().isoformat(),
              "gpu": torch.cuda.get_device_name(0) if gpu else "none (CPU)",
              "command": "PYTHONPATH=. python " + " ".join(map(shlex.quote, sys.argv)),
              "size": args.size, "train_pairs": len(json.loads(
                  pairs.out.train_pairs_json.read_text(encoding="utf-8"))),
              "settings": {"lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "batch": BATCH,
                           "max_length": MAX_LENGTH, "learning_rate": LEARNING_RATE,
                           "beta": BETA, "epochs": args.epochs, "quantization": "nf4, double "
                           "quant, bf16 compute" if gpu else "nf4, float32 compute"},
              "variants": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"dpo_speed_{args.size}.json"
    target.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="6b", help="a shape of benchmarks/models.py")
    ap.add_argument("--pairs", type=int, default=160, help="pairs of the sample used (90 %% "
                    "trained on, the rest the stage's dev pairs)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--home", type=Path, help="PIPELINE_HOME (default: a temp dir)")
    ap.add_argument("--model-dir", type=Path, help="a saved model of --size to use (e.g. the "
                    "one benchmarks/gpu_flow.py built) instead of building one")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--variant", help=argparse.SUPPRESS)          # in a child process
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--train", help=argparse.SUPPRESS)
    ap.add_argument("--dev", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return run_variant(args)

    home = args.home or Path(tempfile.mkdtemp(prefix="dpo-speed-"))
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PIPELINE_HOME"] = str(home)
    import torch

    from benchmarks.models import build_random_model
    from tasks.data.preferences import SAMPLE, build_preferences

    gpu = torch.cuda.is_available()
    model_dir = args.model_dir or home / "models" / args.size
    if not (model_dir / "config.json").is_file():
        build_random_model(args.size, model_dir, "cuda" if gpu else "cpu")
    few = home / "pairs.jsonl"
    few.write_text("".join(SAMPLE.read_text(encoding="utf-8").splitlines(True)[:args.pairs]),
                   encoding="utf-8")
    pairs = build_preferences(few, train_ratio=0.9)
    rows: dict[str, dict] = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", variant, "--model", str(model_dir),
               "--train", str(pairs.out.train_pairs_json), "--dev", str(pairs.out.dev_pairs_json),
               "--epochs", str(args.epochs)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:                             # a failed variant is a row, not the end
            rows[variant] = {"error": (proc.stderr or proc.stdout)[-1500:]}
        else:
            rows[variant] = {**json.loads(line[7:]), "process_s": time.perf_counter() - start}
        print(variant, json.dumps(rows[variant])[:400], flush=True)
        target = write(args, gpu, pairs, rows)       # after each: a time limit keeps the rest
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
