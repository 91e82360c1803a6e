"""Stage "train": LoRA / QLoRA fine-tuning of any Hugging Face causal LM with a chat template.

One code path for the embedded default and a user's Qwen or Llama: conversations are rendered
with the model's own chat template, and only the assistant turns are learned (their content and
the template's closing eos / end-of-turn token, so the model learns to stop). Assistant spans are
found by prefix difference, so multi-turn conversations learn every assistant turn.

lora: the base in full precision + peft LoRA. qlora: the base loaded 4-bit nf4 (bitsandbytes,
also on a CPU) + `prepare_model_for_kbit_training` + LoRA. HF Trainer does the loop: dev loss
before training, every `eval_steps` and at the end; cosine schedule with 5% warmup.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, PrinterCallback, \
    Trainer, TrainingArguments

from tasks.base_model import read_conversations
from tasks.common import DataError, StageResult, atomic_write_json, publish_dir, stage_root, \
    staging_dir
from tasks.config import TrainConfig
from tasks.modeling import bnb_config, load_model, load_tokenizer, pick_device

IGNORE = -100


def _render(tok: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                        add_generation_prompt=generation_prompt))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_conversation(tokenizer: PreTrainedTokenizerBase, conversation: list[dict],
                        max_length: int) -> dict[str, Any]:
    """Token ids of a conversation (the model's chat template) with assistant-only labels.

    For each assistant turn i, its span in the full rendering starts where the rendering of
    turns[:i] + generation prompt stops agreeing with it, and ends where turns[:i+1] does: the
    content and the template's end-of-turn tokens are learned, everything else is -100.
    Returns input_ids, attention_mask, labels (cut to `max_length`) and `truncated`."""
    if isinstance(conversation, dict):
        conversation = conversation["conversations"]
    turns = [{"role": t["role"], "content": t["content"]} for t in conversation]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template: a base model for fine-tuning "
                         "needs one (tokenizer_config.json or chat_template.jinja)")
    ids = _render(tokenizer, turns, False)
    labels = [IGNORE] * len(ids)
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start = _common_prefix(_render(tokenizer, turns[:i], True), ids)
        end = _common_prefix(_render(tokenizer, turns[:i + 1], False), ids)
        labels[start:end] = ids[start:end]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
            "truncated": truncated}


def _encode_file(tok: PreTrainedTokenizerBase, path: Path, max_length: int) -> tuple[list, int, int]:
    """Encoded examples of a conversation file; (examples, #truncated, #dropped: nothing left
    to learn after truncation)."""
    examples, truncated, dropped = [], 0, 0
    for turns in read_conversations(path):
        enc = encode_conversation(tok, turns, max_length)
        truncated += enc.pop("truncated")
        if all(x == IGNORE for x in enc["labels"]):
            dropped += 1
            continue
        examples.append(enc)
    if not examples:
        raise DataError(path, f"no example has an assistant token within train.max_length="
                              f"{max_length}: raise max_length")
    return examples, truncated, dropped


def _load_for_training(base_dir: str, cfg: TrainConfig, device: str):
    """The base with LoRA adapters attached (4-bit base for qlora)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = load_model(base_dir, device=device, dtype=cfg.compute_dtype,
                           quantization=bnb_config("nf4", cfg.double_quant, cfg.compute_dtype))
        model = prepare_model_for_kbit_training(model,
                                                use_gradient_checkpointing=device == "cuda")
        # bitsandbytes 0.50 on AVX512-BF16 CPUs repacks 4-bit weights for inference at the
        # first eval-mode forward (the dev eval) and never back: later training forwards then
        # take a kernel without autograd and silently drop gradients through the base layers.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    else:
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        model = load_model(base_dir, device=device, dtype=dtype)
    model.config.use_cache = False
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules or "all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _log_history(history: list[dict]) -> list[dict]:
    """Trainer's log history reduced to {"step", "loss"} / {"step", "eval_loss"} entries."""
    out, seen = [], set()
    for h in history:
        for key in ("loss", "eval_loss"):
            if key in h and (h["step"], key) not in seen:
                seen.add((h["step"], key))
                out.append({"step": int(h["step"]), key: round(float(h[key]), 5)})
    return out


def train_adapter(base_dir: str | Path, train_json: Path, dev_json: Path,
                  cfg: TrainConfig) -> StageResult:
    """Fine-tune a LoRA (or QLoRA) adapter on train.json, evaluating dev loss before, during and
    after; publish adapter + tokenizer under outputs/train/<digest>/."""
    base_dir = str(base_dir)
    device = pick_device("auto")
    tok = load_tokenizer(base_dir)
    padding_side, tok.padding_side = tok.padding_side, "right"
    train, truncated, dropped = _encode_file(tok, Path(train_json), cfg.max_length)
    dev, dev_truncated, dev_dropped = _encode_file(tok, Path(dev_json), cfg.max_length)

    torch.manual_seed(cfg.seed)
    model = _load_for_training(base_dir, cfg, device)
    trainable, total = model.get_nb_trainable_parameters()
    steps = math.ceil(len(train) / cfg.batch_size) * cfg.epochs
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    with tempfile.TemporaryDirectory(prefix="trainer-") as work:
        args = TrainingArguments(
            output_dir=work, num_train_epochs=cfg.epochs, learning_rate=cfg.learning_rate,
            per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
            lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0,
            eval_strategy="steps", eval_steps=cfg.eval_steps, eval_on_start=True,
            logging_strategy="steps", logging_steps=max(1, round(steps / 50)),
            save_strategy="no", report_to="none", seed=cfg.seed, data_seed=cfg.seed,
            use_cpu=device == "cpu", bf16=bf16, dataloader_num_workers=0,
            remove_unused_columns=False, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True,
                                                               label_pad_token_id=IGNORE))
        trainer.remove_callback(PrinterCallback)      # the log history is returned instead
        t0 = time.perf_counter()
        result = trainer.train()
        train_seconds = time.perf_counter() - t0
        eval_after = trainer.evaluate()["eval_loss"]
    history = trainer.state.log_history
    evals = [h for h in history if "eval_loss" in h]
    eval_before = evals[0]["eval_loss"]
    eval_seconds = sum(h.get("eval_runtime", 0.0) for h in evals[:-1])
    tokens = sum(len(e["input_ids"]) for e in train) * cfg.epochs
    log = _log_history(history)

    tok.padding_side = padding_side
    with staging_dir(stage_root("train")) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "train_log.json", log)
        out, digest = publish_dir(tmp, stage_root("train"))
    metrics = {
        "eval_loss_before": eval_before, "eval_loss_after": eval_after,
        "perplexity_before": math.exp(min(eval_before, 50.0)),
        "perplexity_after": math.exp(min(eval_after, 50.0)),
        "train_loss": float(result.training_loss), "trainable_params": float(trainable),
        "total_params": float(total), "trainable_percent": 100.0 * trainable / total,
        "train_seconds": round(train_seconds, 2),
        "train_tokens_per_s": tokens / max(train_seconds - eval_seconds, 1e-9),
        "truncated_examples": float(truncated), "dev_truncated_examples": float(dev_truncated),
        "dropped_examples": float(dropped + dev_dropped),
        "train_examples": float(len(train)), "dev_examples": float(len(dev)),
    }
    return StageResult(
        stage="train", path=str(out), digest=digest,
        files={"adapter": str(out / "adapter_model.safetensors"),
               "adapter_config": str(out / "adapter_config.json"),
               "train_log": str(out / "train_log.json")},
        metrics={k: float(v) for k, v in metrics.items()},
        info={"log_history": log, "method": cfg.method, "base_dir": base_dir, "device": device,
              "target_modules": sorted(model.peft_config["default"].target_modules)})
