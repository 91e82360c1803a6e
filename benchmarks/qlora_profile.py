"""Where a QLoRA step's time goes at 6 B: bare HF + peft loops that differ in one setting each,
per-step wall time after warm-up, and a torch.profiler look at two steps (GPU busy share, the
ops that take the host's and the GPU's time). The figures behind docs/gpu.md "Fast at real scale".

    PYTHONPATH=. python benchmarks/qlora_profile.py --out benchmarks/results      # on a GPU

Variants (all: nf4 base, LoRA r=16 on every linear layer, batches of 8 in file order, AdamW,
bf16 autocast; `benchmarks/gpu_speed.py` has the anchor and the train stage side by side):
* anchor: `prepare_model_for_kbit_training` with gradient checkpointing (peft's guide);
* no-ckpt: the same without gradient checkpointing;
* no-ckpt+flat: and padding-free batches (transformers' DataCollatorWithFlattening);
* no-upcast: no-ckpt, without `prepare_model_for_kbit_training`'s float32 copies of the
  non-quantized weights (norms, embeddings, head): input grads only;
* no-upcast+no-cudnn: and SDPA without cuDNN attention (tasks/train/train_control.py `attention_kernels`);
* no-upcast+compile: and the model under `torch.compile` (compile time in the first steps);
* project, project-ckpt, project-no-ckpt: the train stage itself (tasks/train/train.py) with its
  default (auto) gradient checkpointing, forced on, forced off: its steady-state step.
Writes qlora_profile_<size>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.qlora_speed import qlora_config, sample_split
from benchmarks.models import build_random_model
from tasks.model.modeling import bnb_config, load_model, load_tokenizer, release
from tasks.train.train_control import attention_kernels

VARIANTS = {
    "anchor": {"checkpointing": True, "flat": False, "upcast": True},
    "no-ckpt": {"checkpointing": False, "flat": False, "upcast": True},
    "no-ckpt+flat": {"checkpointing": False, "flat": True, "upcast": True},
    "no-upcast": {"checkpointing": False, "flat": False, "upcast": False},
    "no-upcast+no-cudnn": {"checkpointing": False, "flat": False, "upcast": False,
                           "no_cudnn": True},
    "no-upcast+compile": {"checkpointing": False, "flat": False, "upcast": False,
                          "no_cudnn": True, "compile": True},
}


def _profile(step, steps: int = 2) -> dict:
    """Run `step` `steps` times under torch.profiler: wall time, kernel time, top ops."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    kernel_s = sum(e.self_device_time_total for e in events) / 1e6 / steps

    def top(key: str, n: int = 12) -> list[dict]:
        rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
        return [{"op": e.key[:80], "calls": e.count // steps,
                 "ms": getattr(e, key) / 1e3 / steps} for e in rows]
    return {"wall_s": wall, "kernel_s": kernel_s, "gpu_busy": kernel_s / wall,
            "kernels_per_step": sum(e.count for e in events if e.device_type.name == "CUDA")
            // steps,
            "top_cuda": top("self_device_time_total"), "top_cpu": top("self_cpu_time_total")}


def run_variant(base_dir: Path, train_json: Path, name: str, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    from tasks.train.train_data import IGNORE, encode_file

    v = VARIANTS[name]
    tok = load_tokenizer(base_dir)
    tok.padding_side = "right"
    examples, _, _ = encode_file(tok, train_json, 160)
    collate = (DataCollatorWithFlattening(separator_id=IGNORE) if v["flat"] else
               DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_model(base_dir, device="cuda", dtype="bfloat16",
                       quantization=bnb_config("nf4", True, "bfloat16"))
    load_s = time.perf_counter() - t0
    if v["upcast"]:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=v["checkpointing"],
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    model.train()
    def kernels():              # a fresh context per step (sdpa_kernel's is single-use)
        return attention_kernels("cuda") if v.get("no_cudnn") else contextlib.nullcontext()

    cursor = {"i": 0}
    losses: list[float] = []

    if v.get("compile"):
        model = torch.compile(model)

    def step() -> None:
        i = cursor["i"] % max(1, len(examples) // 8)
        cursor["i"] += 1
        chunk = examples[i * 8:(i + 1) * 8]
        batch = {k: v.cuda(non_blocking=True) for k, v in collate(chunk).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16), kernels():
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    prof = _profile(step)
    tokens = sum(len(e["input_ids"]) for e in examples[:8 * (len(examples) // 8)]) / \
        max(1, len(examples) // 8)
    out = {"load_s": load_s, "step_s_median": statistics.median(times[2:]),
           "step_s": times, "tokens_per_step": tokens,
           "useful_tok_s": tokens / statistics.median(times[2:]),
           "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20,
           "losses": losses[:steps], "profile": prof, **v}
    model = opt = None          # noqa: F841 (the closure's references, freed)
    release("cuda")
    return out


def run_project(base_dir: Path, train_json: Path, dev_json: Path, steps: int,
                checkpointing: bool | None) -> dict:
    """The train stage itself (tasks/train/train.py: HF Trainer, padding-free packing) on the same
    batches in file order; its steady-state step time is `step_seconds_median`."""
    from tasks.train.train import train_adapter

    cfg = qlora_config(train_json, steps, checkpointing)
    t0 = time.perf_counter()
    r = train_adapter(base_dir, train_json, dev_json, cfg)
    release("cuda")
    return {"stage_s": time.perf_counter() - t0, "step_s_median": r.metrics["step_seconds_median"],
            "useful_tok_s_whole_run": r.metrics["train_tokens_per_s"],
            "peak_cuda_mib": r.metrics["peak_gpu_memory_gib"] * 1024,
            "losses": [h["loss"] for h in r.history if "loss" in h][:steps],
            "checkpointing": r.out.gradient_checkpointing, "flat": True, "upcast": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="6b")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--project", nargs="*", choices=["auto", "ckpt", "no-ckpt"],
                    default=["auto", "ckpt"], help="train-stage runs: gradient checkpointing "
                    "as its default chooses (auto), forced on (ckpt) or off (no-ckpt)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qlora-profile-"))
    os.environ.setdefault("PIPELINE_HOME", str(work / "home"))
    base_dir, params = build_random_model(args.size, work / "model", "cuda")
    train_json, dev_json = sample_split(work)
    result = {"gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
              "params": params, "torch": torch.__version__, "variants": {}}
    target = args.out / f"qlora_profile_{args.size}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    tokens_per_step = mean_tokens_per_step(base_dir, train_json)

    def save(name: str, r: dict) -> None:
        result["variants"][name] = r
        target.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")

    # compiled variants last: their compile time is the least predictable
    for name in sorted(args.variants, key=lambda n: VARIANTS[n].get("compile", False)):
        if VARIANTS[name].get("compile"):
            for choice in args.project:
                save(*project(base_dir, train_json, dev_json, args.steps, choice,
                              tokens_per_step))
            args.project = []
        r = run_variant(base_dir, train_json, name, args.steps)
        save(name, r)
        p = r["profile"]
        print(f"[{name}] {r['step_s_median'] * 1e3:.0f} ms/step, {r['useful_tok_s']:.0f} "
              f"useful tok/s, GPU busy {p['gpu_busy']:.0%}, {p['kernels_per_step']} kernels/"
              f"step, peak {r['peak_cuda_mib']:,.0f} MiB, load {r['load_s']:.0f} s", flush=True)
        for key in ("top_cuda", "top_cpu"):
            print(f"  {key}: " + "; ".join(f"{o['op']} {o['ms']:.1f} ms x{o['calls']}"
                                            for o in p[key][:6]), flush=True)
    for choice in args.project:
        save(*project(base_dir, train_json, dev_json, args.steps, choice, tokens_per_step))


def mean_tokens_per_step(base_dir: Path, train_json: Path) -> float:
    """Useful tokens in a batch of 8, averaged over the file-order batches."""
    from tasks.train.train_data import encode_file

    examples, _, _ = encode_file(load_tokenizer(base_dir), train_json, 160)
    batches = len(examples) // 8
    return sum(len(e["input_ids"]) for e in examples[:8 * batches]) / batches


def project(base_dir: Path, train_json: Path, dev_json: Path, steps: int, choice: str,
            tokens_per_step: float) -> tuple[str, dict]:
    name = "project" if choice == "auto" else f"project-{choice}"
    checkpointing = {"auto": None, "ckpt": True, "no-ckpt": False}[choice]
    r = run_project(base_dir, train_json, dev_json, steps + 4, checkpointing)
    r["useful_tok_s"] = tokens_per_step / r["step_s_median"]
    print(f"[{name}] {r['step_s_median'] * 1e3:.0f} ms/step, {r['useful_tok_s']:.0f} useful "
          f"tok/s in steady state ({r['useful_tok_s_whole_run']:.0f} over the whole run), "
          f"checkpointing {r['checkpointing']}, peak {r['peak_cuda_mib']:,.0f} MiB, stage "
          f"{r['stage_s']:.0f} s", flush=True)
    return name, r

if __name__ == "__main__":
    main()
