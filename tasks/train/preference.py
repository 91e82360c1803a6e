"""Stage "preference": preference tuning after supervised fine-tuning (README "Preference
tuning"), on TRL's trainers -- their losses, not ours.

The supervised adapter has been merged (stage merge); a new LoRA adapter is trained on that
merged model with `preference.method`:

* `dpo`: TRL's `DPOTrainer`. With a peft adapter, TRL's reference model is the same model with
  the adapter switched off: the merged supervised model, held in memory once;
* `orpo`: TRL's ORPO (`trl.experimental.orpo`), which needs no reference model.

With `preference.quantized` the merged model is loaded in 4 bits (nf4) under the adapter:
QLoRA-DPO. Like the train stage it checkpoints every `save_steps` and, on SIGTERM, the step in
flight, and a re-run of the same inputs resumes (tasks/train/train_control.py). Loss, rewards of
chosen and rejected, their margin and accuracy, and the log-probabilities are kept per logged
step (the stage's history, MLflow step metrics). Output: the adapter under
outputs/preference/<digest>/, which the merge_preference stage folds into the supervised model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from tasks.config import PreferenceConfig
from tasks.model.modeling import load_tokenizer, pick_device, resolve_dtype
from tasks.runtime.files import atomic_write_json, publish_dir, read_json, staging_dir
from tasks.runtime.results import Metrics, StageName, StageResult, stage_entry, stage_output, \
    stage_root
from tasks.train.train_control import DeferredSigterm, checkpoint_folder, control_callbacks, \
    in_loop_eval_seconds, last_checkpoint, list_checkpoints, load_trainable, resumed_step, \
    rounded, train_and_evaluate

#: what TRL logs per step that is kept as the stage's curves
CURVES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
          "logps/chosen", "logps/rejected")
NOT_IN_KEY = {"resume", "save_total_limit"}


def checkpoint_dir(model_dir: str | Path, train_pairs: Path, dev_pairs: Path,
                   cfg: PreferenceConfig) -> Path:
    """outputs/preference-checkpoints/<hash> (tasks/train/train_control.py
    `checkpoint_folder`)."""
    return checkpoint_folder("preference", "tasks.train.preference",
                             {"model": model_dir, "train": train_pairs, "dev": dev_pairs}, cfg,
                             NOT_IN_KEY)


def as_dataset(pairs_json: Path):
    """TRL's conversational preference format: prompt messages, then the chosen and the
    rejected answer as one assistant message each; `length` (characters of the prompt and the
    longer answer) lets the trainer batch pairs of similar length (less padding)."""
    from datasets import Dataset

    pairs = read_json(pairs_json)
    return Dataset.from_list([
        {"prompt": p["prompt"],
         "chosen": [{"role": "assistant", "content": p["chosen"]}],
         "rejected": [{"role": "assistant", "content": p["rejected"]}],
         "length": sum(len(m["content"]) for m in p["prompt"])
         + max(len(p["chosen"]), len(p["rejected"]))} for p in pairs])


def use_liger(cfg: PreferenceConfig, device: str) -> bool:
    """`preference.liger`, or by default: on a GPU where liger-kernel is installed
    (`make setup GPU=1`)."""
    if cfg.liger is not None:
        return cfg.liger
    return device.startswith("cuda") and importlib.util.find_spec("liger_kernel") is not None


@stage_output
class PreferenceAdapter:
    """The preference adapter's folder, what its training measured (`measured`: losses,
    rewards, accuracy before and after, tokens/s, steps) and how it was trained."""

    adapter_config_json: Path
    preference_log_json: Path
    measured: Metrics
    method: str                             # "dpo" | "orpo"
    model_dir: str
    quantized: bool
    checkpoint_dir: str
    checkpoints: list[dict]
    resumed_from: str | None


def _trainer(method: str, model: Any, tok: Any, cfg: PreferenceConfig, ckpt: Path, device: str,
             train: Any, dev: Any, callbacks: list, fresh: bool) -> Any:
    from peft import LoraConfig

    if cfg.learning_rate is None:
        raise ValueError("preference.learning_rate is not set (PreferenceConfig.for_base)")
    common = dict(output_dir=str(ckpt), num_train_epochs=cfg.epochs,
                  learning_rate=cfg.learning_rate, per_device_train_batch_size=cfg.batch_size,
                  per_device_eval_batch_size=cfg.batch_size, lr_scheduler_type="cosine",
                  warmup_steps=0.05, max_length=cfg.max_length, beta=cfg.beta,
                  eval_strategy="steps", eval_steps=cfg.eval_steps, eval_on_start=fresh,
                  logging_strategy="steps", logging_steps=1, save_strategy="steps",
                  save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
                  report_to="none", seed=cfg.seed, data_seed=cfg.seed,
                  use_cpu=device == "cpu", disable_tqdm=True, dataloader_num_workers=0,
                  gradient_checkpointing=device.startswith("cuda")
                  if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing,
                  train_sampling_strategy="group_by_length" if cfg.group_by_length
                  else "random", use_liger_kernel=use_liger(cfg, device),
                  remove_unused_columns=False,         # keep `length` for the sampler
                  bf16=device.startswith("cuda") and torch.cuda.is_bf16_supported())
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer(model=model, args=ORPOConfig(**common), train_dataset=train,
                           eval_dataset=dev, processing_class=tok, peft_config=lora,
                           callbacks=callbacks)
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer(model=model, args=DPOConfig(**common, loss_type=["sigmoid"]),
                      train_dataset=train, eval_dataset=dev, processing_class=tok,
                      peft_config=lora, callbacks=callbacks)


def curves(history: list[dict]) -> list[dict]:
    """TRL's log history reduced to the stage's curves: per logged step, the train values of
    CURVES and, where it evaluated, the same on the dev pairs (`eval_` prefix)."""
    out = []
    for h in history:
        row = {k: rounded(h[k]) for k in CURVES if k in h}
        row |= {f"eval_{k}": rounded(h[f"eval_{k}"]) for k in CURVES
                if f"eval_{k}" in h}
        if row:
            out.append({"step": int(h["step"]), **row})
    return out


def tune_preferences(model_dir: str | Path, train_pairs: Path, dev_pairs: Path,
                     cfg: PreferenceConfig) -> StageResult:
    """Train a preference adapter on the merged supervised model at `model_dir` with
    `cfg.method` on the train pairs, evaluated on the dev pairs before, during and after;
    publish it under outputs/preference/<digest>/ (see the module docstring)."""
    device = pick_device("auto")
    ckpt = checkpoint_dir(model_dir, Path(train_pairs), Path(dev_pairs), cfg)
    tok = load_tokenizer(model_dir)
    model = load_trainable(model_dir, device, resolve_dtype("auto", device), nf4=cfg.quantized)
    model.config.use_cache = False
    train, dev = as_dataset(Path(train_pairs)), as_dataset(Path(dev_pairs))
    sigterm = DeferredSigterm()
    last = last_checkpoint(ckpt) if cfg.resume else None
    trainer = _trainer(cfg.method, model, tok, cfg, ckpt, device, train, dev,
                       control_callbacks(sigterm), fresh=last is None)  # resumed: step 0 logged
    trained = train_and_evaluate(trainer, sigterm, last, device)
    result, seconds = trained.output, trained.seconds
    history = curves(trainer.state.log_history)
    evals = [h for h in history if "eval_loss" in h]
    # TRL counts non-padding tokens from 0 in each process (DPOTrainer._total_train_tokens is
    # not checkpointed); a resumed history also holds the killed run's counts: this run's own
    # are its steps after the resume
    counted = [h["num_tokens"] for h in trainer.state.log_history
               if "num_tokens" in h and h["step"] > resumed_step(last)]
    tokens = counted[-1] if counted else 0
    evaluating = in_loop_eval_seconds(trainer.state.log_history, last, trained.evaluated_at_end)
    with staging_dir(stage_root(StageName.PREFERENCE)) as tmp:
        trainer.model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "preference_log.json", history)
        out, digest = publish_dir(tmp, stage_root(StageName.PREFERENCE))
    first, final = evals[0], evals[-1]
    metrics = {"train_loss": float(result.training_loss), "train_seconds": round(seconds, 2),
               "global_step": float(trainer.state.global_step),
               "train_pairs": float(len(train)), "dev_pairs": float(len(dev)),
               "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30
               if device.startswith("cuda") else 0.0}
    for key in ("loss", "rewards/accuracies", "rewards/margins"):
        if f"eval_{key}" in final:
            name = key.replace("/", "_")
            metrics[f"eval_{name}_before"] = first.get(f"eval_{key}", float("nan"))
            metrics[f"eval_{name}_after"] = final[f"eval_{key}"]
    if tokens:        # the training loop's throughput: evaluation time left out
        metrics["train_tokens"] = float(tokens)
        metrics["train_tokens_per_s"] = tokens / max(seconds - evaluating, 1e-9)
    return StageResult(stage=StageName.PREFERENCE, path=str(out), digest=digest, device=device,
                       history=[{k.replace("/", "_"): v for k, v in h.items()} for h in history],
                       out=PreferenceAdapter(
        adapter_config_json=out / "adapter_config.json",
        preference_log_json=out / "preference_log.json", measured=metrics, method=cfg.method,
        model_dir=str(model_dir), quantized=cfg.quantized, checkpoint_dir=str(ckpt),
        checkpoints=list_checkpoints(ckpt), resumed_from=last))


#: TRL tokenizes the pairs with `datasets.map`, whose fingerprint asks dill for a function's
#: globals, and dill reads them from `dis.dis` printed into a captured sys.stdout (dill
#: detect.nestedglobals); under a flow's `log_prints` Prefect's print patch sends each line of
#: that bytecode listing to the run log instead (prefect/logging/loggers.py print_as_log).
@stage_entry(StageName.PREFERENCE, model_libs=True, extra_libs=("trl",), own_process=True,
             log_prints=False, logged_as="preference_adapter")
def stage(supervised: StageResult, pairs: StageResult, cfg: PreferenceConfig) -> StageResult:
    """The stage: a preference adapter on the merged supervised model, from the
    preference_data stage's pairs."""
    return tune_preferences(supervised.path, pairs.out.train_pairs_json,
                            pairs.out.dev_pairs_json, cfg)
