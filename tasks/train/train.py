"""Stage "train": LoRA / QLoRA / P-Tuning v2 fine-tuning of any Hugging Face causal LM with a
chat template, through one code path (peft + HF Trainer).

lora: the base in full precision + peft LoRA. qlora: the base loaded 4-bit nf4 (bitsandbytes,
also on a CPU) + `prepare_model_for_kbit_training` + LoRA. ptuning: P-Tuning v2 = peft prefix
tuning (trained key/value prefixes in every layer, optionally through a projection MLP).
Only assistant turns are learned (tasks.train.train_data). HF Trainer does the loop: dev loss before
training, every `eval_steps` and at the end; cosine schedule with 5% warmup.

Packing (`packing`, lora/qlora): padding-free batches through transformers'
DataCollatorWithFlattening; transformers keeps attention within each example from the restarting
position ids. Useful (non-pad) tokens/s and the share of pad tokens are reported either way.

Resume: checkpoints (adapter + optimizer + scheduler + RNG, HF Trainer's format) go to
outputs/train-checkpoints/<hash of base, data files, config and this stage's code>/ every
`save_steps`, so a killed run of the same inputs resumes from the last one and its loss curve
continues. SIGTERM (preemption, `kill`, a cancelled flow run) is not a crash: the step in
flight finishes, a checkpoint is saved at that step, and the process then dies of the signal
as it would have (or the previous handler runs). Under torchrun the launching process passes
SIGTERM on, and the ranks agree on the step.

Multi-GPU: with more than one CUDA device (or `num_gpus`), the stage re-launches itself through
torchrun (`python -m tasks.train.train --worker spec.json`, DDP) and waits; the caller (a Prefect
task) stays one process.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, \
    TrainingArguments

from tasks.runtime.paths import REPO_DIR, project_dir
from tasks.runtime.results import Info, Metrics, StageName, StageResult, stage_entry, \
    stage_output, stage_root
from tasks.runtime.files import (
    atomic_write_json,
    publish_dir,
    read_json,
    staging_dir,
)
from tasks.config import TrainConfig
from tasks.config.methods import METHODS
from tasks.model.modeling import load_tokenizer, pick_device, resolve_dtype
from tasks.train.train_control import (
    DeferredSigterm,
    StepTimes,
    checkpoint_folder,
    control_callbacks,
    in_loop_eval_seconds,
    last_checkpoint,
    list_checkpoints,
    load_trainable,
    log_history,
    resumed_step,
    train_and_evaluate,
)
from tasks.train.train_data import (
    IGNORE,
    encode_conversation,
    encode_file,
    plot_loss_curve,
    write_sanity,
)

__all__ = ["IGNORE", "encode_conversation", "train_adapter", "checkpoint_dir", "last_checkpoint",
           "learning_rate"]
#: config fields that do not change what is trained (left out of the checkpoint key)
NOT_IN_KEY = {"resume", "save_total_limit", "sanity_examples"}


@stage_output
class Adapter:
    """The trained adapter (or prefix) folder's files, its dev loss before and after, the rest of
    what training measured (`measured`: tokens/s, steps, truncation, peak memory, ...) and how it
    was trained."""

    adapter_model_safetensors: Path
    adapter_config_json: Path
    train_log_json: Path
    loss_curve_png: Path
    sanity_check_md: Path | None            # train.sanity_examples > 0
    sanity_check_tsv: Path | None
    eval_loss_before: float
    eval_loss_after: float
    measured: Metrics
    method: str
    base_dir: str
    gradient_checkpointing: bool
    learning_rate: Info[float]
    checkpoint_dir: str
    checkpoints: list[dict]
    resumed_from: str | None
    target_modules: list[str]


def learning_rate(cfg: TrainConfig) -> float:
    return cfg.learning_rate or METHODS[cfg.method].learning_rate


def checkpoint_dir(base_dir: str | Path, train_json: Path, dev_json: Path,
                   cfg: TrainConfig) -> Path:
    """outputs/train-checkpoints/<hash> (tasks/train/train_control.py `checkpoint_folder`)."""
    return checkpoint_folder("train", "tasks.train.train",
                             {"base": base_dir, "train": train_json, "dev": dev_json}, cfg,
                             NOT_IN_KEY)


@torch.no_grad()
def _init_prefix(model, ids: list[int]) -> None:
    """Start the P-Tuning v2 prefix as the keys/values the base computes for real text.

    peft's default prefix is N(0, 1) noise in every layer's keys and values: it swamps the
    attention of a small model from the first step (`<UNK>` soup at loss 7 in ChatGLM's ADGEN P-Tuning example). The
    base's own cache for a real token sequence is a prefix it already handles, and positions
    agree (the prefix is positions 0..n-1, the input continues from n)."""
    emb = model.prompt_encoder["default"].embedding.weight
    n = emb.shape[0]
    ids = (ids * (n // max(len(ids), 1) + 1))[:n]
    base = model.get_base_model()
    cache = base(input_ids=torch.tensor([ids], device=emb.device), use_cache=True).past_key_values
    kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]   # (1, H, n, hd)
    stacked = torch.stack([t[0] for t in kv])                                # (L*2, H, n, hd)
    emb.copy_(stacked.permute(2, 0, 1, 3).reshape(n, -1).to(emb.dtype))


#: activations kept per token without gradient checkpointing, per layer, in bytes per unit of
#: hidden size, plus per vocabulary entry for the logits and their loss: measured at 6 B on an
#: H200 (QLoRA, bf16 autocast: 9.3 GiB peak for batches of 8 x <=160 tokens,
#: benchmarks/qlora_profile.py, docs/gpu.md "Fast at real scale") and rounded up
ACTIVATION_BYTES = {"per_hidden_and_layer": 96, "per_vocab": 12}


def activation_bytes(model_config: Any, tokens: int) -> int:
    """Estimated activation memory of a training step of `tokens` tokens, no checkpointing."""
    text = getattr(model_config, "text_config", None) or model_config
    per_token = (ACTIVATION_BYTES["per_hidden_and_layer"] * text.hidden_size
                 * text.num_hidden_layers + ACTIVATION_BYTES["per_vocab"] * text.vocab_size)
    return tokens * per_token


def gradient_checkpointing(cfg: TrainConfig, device: str, model: Any = None) -> bool:
    """`train.gradient_checkpointing`, or by default: on a GPU, for a method that supports it,
    on only when a full batch's activations (batch_size x max_length tokens) would take more
    than half the GPU memory left after loading `model`. Off is the faster choice (a bare QLoRA
    step at 6 B: 360 ms without, 563 ms with), on the smaller one (12.2 vs 6.6 GiB peak)."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    if not (METHODS[cfg.method].gradient_checkpointing and device.startswith("cuda")):
        return False
    if model is None:
        raise ValueError("the default gradient checkpointing choice needs the loaded model")
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return checkpointing_needed(model.config, cfg.batch_size * cfg.max_length, free)


def checkpointing_needed(model_config: Any, tokens: int, free_bytes: int) -> bool:
    """Whether a step of `tokens` tokens would keep activations of more than half of
    `free_bytes` without gradient checkpointing (the default choice above)."""
    return activation_bytes(model_config, tokens) > free_bytes / 2


def _load_for_training(base_dir: str, cfg: TrainConfig, device: str,
                       init_ids: list[int] | None = None) -> tuple[Any, bool]:
    """The base with the method's peft adapter attached (tasks/config/methods.py): LoRA, on a 4-bit
    base for qlora, or a prefix (ptuning; initialised from the base's keys/values for
    `init_ids` when given); and whether gradient checkpointing is on.

    The 4-bit base is not passed through peft's `prepare_model_for_kbit_training`: its float32
    copies of the norms, embeddings and head cost 2.9 GiB and 7 % of a step at 6 B, and peft
    freezes the base itself (docs/gpu.md "Fast at real scale")."""
    from peft import get_peft_model

    method = METHODS[cfg.method]
    dtype = cfg.compute_dtype if method.loads_4bit else resolve_dtype("auto", device)
    model = load_trainable(base_dir, device, dtype, nf4=method.loads_4bit,
                           double_quant=cfg.double_quant)
    checkpointing = gradient_checkpointing(cfg, device, model)
    if checkpointing:                                   # non-reentrant: works under DDP
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.config.use_cache = False
    peft_cfg = method.peft_config(cfg, model.config.hidden_size)
    model = get_peft_model(model, peft_cfg)
    if peft_cfg.peft_type == "PREFIX_TUNING" and init_ids and not cfg.prefix_projection:
        _init_prefix(model, init_ids)
    return model, checkpointing


def _num_gpus(cfg: TrainConfig) -> int:
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.num_gpus > have:
        raise RuntimeError(f"train.num_gpus={cfg.num_gpus} but torch sees {have} CUDA devices")
    return cfg.num_gpus or have


@stage_entry(StageName.TRAIN, model_libs=True, own_process=True, logged_as="adapter")
def stage(base: StageResult, data: StageResult, cfg: TrainConfig) -> StageResult:
    """The stage: an adapter on the base stage's model, from the conversations stage's split."""
    return train_adapter(base.path, data.out.train_json, data.out.dev_json, cfg)


def train_adapter(base_dir: str | Path, train_json: Path, dev_json: Path,
                  cfg: TrainConfig) -> StageResult:
    """Fine-tune a LoRA / QLoRA / P-Tuning v2 adapter on train.json, evaluating dev loss before,
    during and after; resume from the checkpoints of an interrupted run of the same inputs;
    publish adapter + tokenizer + train_log.json + loss_curve.png + sanity_check.* under
    outputs/train/<digest>/. More than one GPU: data-parallel through torchrun."""
    ckpt = checkpoint_dir(base_dir, train_json, dev_json, cfg)
    gpus = _num_gpus(cfg)
    # also one GPU of several goes through torchrun: in one plain process HF Trainer would
    # spread the batch over every visible GPU with nn.DataParallel
    if (gpus > 1 or torch.cuda.device_count() > 1) and "LOCAL_RANK" not in os.environ:
        return _launch(gpus, base_dir, train_json, dev_json, cfg, ckpt)
    result = _train(str(base_dir), Path(train_json), Path(dev_json), cfg, ckpt)
    assert result is not None
    return result


def _launch(gpus: int, base_dir, train_json, dev_json, cfg: TrainConfig, ckpt: Path
            ) -> StageResult:
    """Run the worker on `gpus` processes with torchrun and return rank 0's StageResult."""
    ckpt.mkdir(parents=True, exist_ok=True)
    spec, result = ckpt / "launch_spec.json", ckpt / "launch_result.json"
    result.unlink(missing_ok=True)
    atomic_write_json(spec, {"base_dir": str(base_dir), "train_json": str(train_json),
                             "dev_json": str(dev_json), "cfg": cfg.model_dump(mode="json"),
                             "checkpoints": str(ckpt), "result": str(result)})
    env = {**os.environ, "PIPELINE_HOME": str(project_dir()),
           "PYTHONPATH": os.pathsep.join([str(REPO_DIR), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={gpus}", "-m", "tasks.train.train", "--worker", str(spec)]
    proc = subprocess.Popen(cmd, cwd=REPO_DIR, env=env)
    # SIGTERM here goes on to torchrun, which passes it to every rank: they checkpoint the
    # same step and exit; then this process dies of the signal too
    with DeferredSigterm(on_signal=lambda: proc.send_signal(signal.SIGTERM)):
        returncode = proc.wait()
    if returncode != 0 or not result.is_file():
        raise RuntimeError(f"multi-GPU training failed (exit {returncode}): {' '.join(cmd)}")
    return StageResult.from_json(read_json(result))


def _train(base_dir: str, train_json: Path, dev_json: Path, cfg: TrainConfig, ckpt: Path
           ) -> StageResult | None:
    """The training itself, in this process (one rank under torchrun: only rank 0 publishes
    and returns a result)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device("auto")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    tok = load_tokenizer(base_dir)
    padding_side, tok.padding_side = tok.padding_side, "right"
    train, truncated, dropped = encode_file(tok, train_json, cfg.max_length)
    dev, dev_truncated, dev_dropped = encode_file(tok, dev_json, cfg.max_length)

    torch.manual_seed(cfg.seed)
    model, checkpointing = _load_for_training(base_dir, cfg, device,
                                              init_ids=train[0]["input_ids"])
    trainable, total = model.get_nb_trainable_parameters()
    steps = math.ceil(len(train) / (cfg.batch_size * world)) * cfg.epochs
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    last = last_checkpoint(ckpt) if cfg.resume else None
    args = TrainingArguments(
        output_dir=str(ckpt), num_train_epochs=cfg.epochs, learning_rate=learning_rate(cfg),
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0,
        eval_strategy="steps", eval_steps=cfg.eval_steps, eval_on_start=last is None,
        logging_strategy="steps", logging_steps=max(1, round(steps / 50)),
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        report_to="none", seed=cfg.seed, data_seed=cfg.seed,
        use_cpu=device == "cpu", bf16=bf16, dataloader_num_workers=0,
        **({} if cfg.shuffle else {"train_sampling_strategy": "sequential"}),
        ddp_find_unused_parameters=False if world > 1 else None,
        remove_unused_columns=False, disable_tqdm=True,
        include_num_input_tokens_seen="all")       # pads included: the padding share below
    collator = (DataCollatorWithFlattening(separator_id=IGNORE) if cfg.packing
                else DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE))
    sigterm, step_times = DeferredSigterm(), StepTimes()
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      data_collator=collator,
                      callbacks=[*control_callbacks(sigterm), step_times])
    trained = train_and_evaluate(trainer, sigterm, last, device)
    result, train_seconds = trained.output, trained.seconds
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    if rank != 0:
        return None

    history = trainer.state.log_history
    evals = [h for h in history if "eval_loss" in h]
    eval_before, eval_after = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    resumed = resumed_step(last)
    done = (trainer.state.global_step - resumed) / max(trainer.state.global_step, 1)
    eval_seconds = in_loop_eval_seconds(history, last, trained.evaluated_at_end)
    useful = sum(len(e["input_ids"]) for e in train) * cfg.epochs    # the whole run, no pads
    seen = trainer.state.num_input_tokens_seen or useful             # ... and with its pads
    log = log_history(history)
    checkpoints = list_checkpoints(ckpt)

    tok.padding_side = padding_side
    with staging_dir(stage_root(StageName.TRAIN)) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "train_log.json", log)
        plot_loss_curve(log, tmp / "loss_curve.png", f"{cfg.method}: train / dev loss")
        write_sanity(tmp, tok, train, cfg.sanity_examples)
        out, digest = publish_dir(tmp, stage_root(StageName.TRAIN))
    metrics = {                # eval_loss_before/after are fields of their own (Adapter)
        "perplexity_before": math.exp(min(eval_before, 50.0)),
        "perplexity_after": math.exp(min(eval_after, 50.0)),
        "train_loss": float(result.training_loss), "trainable_params": float(trainable),
        "total_params": float(total), "trainable_percent": 100.0 * trainable / total,
        "train_seconds": round(train_seconds, 2),
        "train_tokens_per_s": useful * done / max(train_seconds - eval_seconds, 1e-9),
        "padding_fraction": max(0.0, 1.0 - useful / seen), "packing": float(cfg.packing),
        "truncated_examples": float(truncated), "dev_truncated_examples": float(dev_truncated),
        "dropped_examples": float(dropped + dev_dropped),
        "train_examples": float(len(train)), "dev_examples": float(len(dev)),
        "global_step": float(trainer.state.global_step),
        "resumed_from_step": float(resumed), "checkpoints": float(len(checkpoints)),
        "num_processes": float(world), "peak_gpu_memory_gib": peak_gib,
    }
    if (step_s := step_times.median()) is not None:     # steady state, evals left out
        metrics["step_seconds_median"] = step_s
    sanity = cfg.sanity_examples > 0
    peft_cfg = model.peft_config["default"]
    return StageResult(stage=StageName.TRAIN, path=str(out), digest=digest, history=log,
                       device=device, out=Adapter(
        adapter_model_safetensors=out / "adapter_model.safetensors",
        adapter_config_json=out / "adapter_config.json", train_log_json=out / "train_log.json",
        loss_curve_png=out / "loss_curve.png",
        sanity_check_md=out / "sanity_check.md" if sanity else None,
        sanity_check_tsv=out / "sanity_check.tsv" if sanity else None,
        eval_loss_before=eval_before, eval_loss_after=eval_after,
        measured={k: float(v) for k, v in metrics.items()},
        method=cfg.method, base_dir=str(base_dir), gradient_checkpointing=checkpointing,
        learning_rate=learning_rate(cfg), checkpoint_dir=str(ckpt), checkpoints=checkpoints,
        resumed_from=last,
        target_modules=sorted(getattr(peft_cfg, "target_modules", None) or [])))


def _worker(spec_path: Path) -> None:
    spec = read_json(spec_path)
    res = _train(spec["base_dir"], Path(spec["train_json"]), Path(spec["dev_json"]),
                 TrainConfig.model_validate(spec["cfg"]), Path(spec["checkpoints"]))
    if res is not None:
        atomic_write_json(Path(spec["result"]), res.to_json())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="train stage worker (one torchrun rank)")
    ap.add_argument("--worker", type=Path, required=True, help="launch spec JSON")
    logging.basicConfig(level=logging.INFO, format="%(message)s")   # rank 0's progress lines
    _worker(ap.parse_args().worker)
