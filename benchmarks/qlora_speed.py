"""The QLoRA part of benchmarks/gpu_speed.py: the train stage (tasks/train/train.py) against two
anchors on the same model, data, batches (file order), LoRA and optimizer settings -- a bare
HF + peft QLoRA loop, and TRL's `SFTTrainer` with padding-free batches and Liger kernels --
with useful (non-pad) tokens/s, peak CUDA memory and the first 20 steps' losses of each.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tasks.data.conversations import qa_to_conversation, split_train_dev
from tasks.data.qa_text import read_qa_text
from tasks.model.modeling import load_tokenizer, release
from tasks.runtime import child_process
from tasks.runtime.files import atomic_write_json
from tasks.runtime.paths import DATA_DIR


def sample_split(folder: Path) -> tuple[Path, Path]:
    pairs = read_qa_text(DATA_DIR / "sample" / "plant_care_qa.txt")
    train, dev = split_train_dev([qa_to_conversation(p["q"], p["a"]) for p in pairs])
    return (atomic_write_json(folder / "train.json", train),
            atomic_write_json(folder / "dev.json", dev))


def anchor_loop(base_dir: Path, train_json: Path, cfg, steps: int) -> dict:
    """The bare HF + peft QLoRA loop as peft's and bitsandbytes' guides write it: 4-bit nf4 base,
    `prepare_model_for_kbit_training` (gradient checkpointing on, its default), LoRA on every
    linear layer, padded batches in file order, AdamW, cosine schedule, bf16 autocast."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, \
        DataCollatorForSeq2Seq, get_cosine_schedule_with_warmup

    from tasks.train.train_data import IGNORE, encode_file

    tok = load_tokenizer(base_dir)
    tok.padding_side = "right"
    examples, _, _ = encode_file(tok, train_json, cfg.max_length)
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), device_map={"": "cuda"}, dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                             lora_dropout=cfg.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0, fused=True)
    total = math.ceil(len(examples) / cfg.batch_size) * cfg.epochs
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(0.05 * total), math.ceil(total))
    torch.cuda.reset_peak_memory_stats()
    model.train()
    losses, useful, ends = [], 0, []
    torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(steps):
        chunk = examples[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        batch = {k: v.cuda() for k, v in collate(chunk).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        useful += sum(len(e["input_ids"]) for e in chunk)
        torch.cuda.synchronize()
        ends.append(time.perf_counter())
    seconds = time.perf_counter() - start
    gaps = [b - a for a, b in zip(ends, ends[1:])][2:]      # as tasks/train_control.StepTimes
    peak = torch.cuda.max_memory_allocated() / 2**20
    del model, opt
    release("cuda")
    return {"useful_tok_s": useful / seconds, "losses": losses, "peak_cuda_mib": peak,
            "seconds": seconds, "step_s_median": statistics.median(gaps) if gaps else None,
            "tokens_per_step": useful / steps}


def trl_liger_anchor(base_dir: Path, train_json: Path, cfg, steps: int,
                     liger: bool = True) -> dict:
    """The strongest peer recipe: TRL's `SFTTrainer` with its fastest switches -- padding-free
    batches, `use_liger_kernel=True` (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE), bf16,
    gradient checkpointing off -- on the same nf4 model, LoRA, batches of 8 in file order,
    learning rate and schedule; the loss on the answer only (prompt-completion pairs). Run in a
    process of its own: Liger patches the model's classes for the whole process."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    gpu = torch.cuda.is_available()
    convs = json.loads(train_json.read_text(encoding="utf-8"))
    data = Dataset.from_list([{"prompt": c["conversations"][:-1],
                               "completion": c["conversations"][-1:]} for c in convs])
    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), device_map={"": "cuda" if gpu else "cpu"}, dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps,
                     per_device_train_batch_size=cfg.batch_size,
                     learning_rate=cfg.learning_rate, lr_scheduler_type="cosine",
                     warmup_steps=0.05, weight_decay=0.0, padding_free=True, max_length=None,
                     use_liger_kernel=liger, bf16=gpu, use_cpu=not gpu,
                     gradient_checkpointing=False, train_sampling_strategy="sequential",
                     logging_steps=1, save_strategy="no", report_to="none", seed=cfg.seed)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data,
                         processing_class=load_tokenizer(base_dir),
                         peft_config=LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                lora_dropout=cfg.lora_dropout,
                                                target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    tokens = [h["num_tokens"] for h in history if "num_tokens" in h][-1]
    return {"useful_tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
            "losses": [h["loss"] for h in history if "loss" in h],
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else 0.0}


def qlora_config(train_json: Path, steps: int, checkpointing: bool | None = None):
    """The train stage's settings for the comparison: `steps` batches of 8 in file order, r=16
    all-linear LoRA on nf4, bf16 compute, packing; no eval or checkpoint inside the steps."""
    from tasks.config import TrainConfig

    n = len(json.loads(train_json.read_text(encoding="utf-8")))
    return TrainConfig(method="qlora", compute_dtype="bfloat16", batch_size=8, max_length=160,
                       learning_rate=2e-4, epochs=steps * 8 / n, shuffle=False, packing=True,
                       gradient_checkpointing=checkpointing, eval_steps=10_000,
                       save_steps=10_000, sanity_examples=0, resume=False)


def warm_up(base_dir: Path, train_json: Path, cfg) -> None:
    """Pay the process's one-off CUDA costs (context, cuBLAS, bitsandbytes and attention
    kernels' first use) before either loop is timed: two anchor steps."""
    anchor_loop(base_dir, train_json, cfg, 2)


def run_qlora(base_dir: Path, work: Path, steps: int = 20) -> dict:
    """The train stage, then the anchor, on a process warmed up first. Figures: useful tok/s
    over each whole loop, and in steady state (median step time after two steps, the same
    tokens per step)."""
    from tasks.train.train import train_adapter

    train_json, dev_json = sample_split(work)
    cfg = qlora_config(train_json, steps)
    warm_up(base_dir, train_json, cfg)
    start = time.perf_counter()
    project = train_adapter(base_dir, train_json, dev_json, cfg)
    print(f"[qlora] project: {project.metrics['train_tokens_per_s']:.0f} useful tok/s, "
          f"{time.perf_counter() - start:.0f} s in all", flush=True)
    release("cuda")
    steps_run = int(project.metrics["global_step"])
    anchor = anchor_loop(base_dir, train_json, cfg, steps_run)
    print(f"[qlora] anchor: {anchor['useful_tok_s']:.0f} useful tok/s", flush=True)
    release("cuda")
    try:
        trl = child_process.call(trl_liger_anchor, base_dir, train_json, cfg, steps_run)
        print(f"[qlora] TRL + Liger: {trl['useful_tok_s']:.0f} useful tok/s", flush=True)
    except Exception as error:             # a failed anchor is a figure missing, not a crash
        trl = {"error": f"{type(error).__name__}: {str(error).strip()[:500]}"}
        print(f"[qlora] TRL + Liger failed: {trl['error']}", flush=True)
    project_losses = [h["loss"] for h in project.history if "loss" in h]
    step_s = project.metrics["step_seconds_median"]
    return {"qlora": {
        "project_useful_tok_s": project.metrics["train_tokens_per_s"],
        "anchor_hf_peft_tok_s": anchor["useful_tok_s"],
        "speedup": project.metrics["train_tokens_per_s"] / anchor["useful_tok_s"],
        "project_step_s_median": step_s, "anchor_step_s_median": anchor["step_s_median"],
        "speedup_steady_state": anchor["step_s_median"] / step_s,
        "peak_cuda_mib": project.metrics["peak_gpu_memory_gib"] * 1024,
        "anchor_peak_cuda_mib": anchor["peak_cuda_mib"],
        **({"anchor_trl_liger_tok_s": trl["useful_tok_s"],
            "speedup_vs_trl_liger": project.metrics["train_tokens_per_s"] / trl["useful_tok_s"],
            "anchor_trl_liger_peak_cuda_mib": trl["peak_cuda_mib"],
            "loss_first_20_trl_liger": trl["losses"][:20]} if "error" not in trl
           else {"anchor_trl_liger_error": trl["error"]}),
        "steps": steps_run, "project_settings": {
            "gradient_checkpointing": project.out.gradient_checkpointing,
            "packing": True, "batch_size": 8, "lora_r": cfg.lora_r},
        "loss_first_20_project": project_losses[:20],
        "loss_first_20_anchor": anchor["losses"][:20],
        "max_rel_loss_diff": max(abs(a - b) / abs(b) for a, b in
                                 zip(project_losses[:20], anchor["losses"][:20]))}}
