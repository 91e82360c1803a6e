"""Process control around the HF Trainer of the train and preference stages: a progress line
per logging step, SIGTERM turned into "checkpoint this step and stop", the checkpoints on disk,
the base loaded for training and the evaluation that closes a run.

Kept apart from tasks/train/train.py and tasks/train/preference.py, which say what is trained;
this says how a run behaves when it is watched, stopped and resumed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel
from transformers import TrainerCallback

from tasks.model.compat import bnb_generic_cpu_path
from tasks.model.modeling import bnb_config, load_model
from tasks.runtime.code_version import code_digest
from tasks.runtime.files import digest_bytes, digest_path, read_json
from tasks.runtime.paths import project_dir
from tasks.runtime.pause import pause_point
from tasks.runtime.progress import Progress

log = logging.getLogger("tasks.train")      # the train stage's log (also under torchrun)


def checkpoint_folder(stage: str, module: str, inputs: dict[str, str | Path], cfg: BaseModel,
                      exclude: set[str]) -> Path:
    """outputs/<stage>-checkpoints/<hash>: deterministic in the `inputs` files' content, the
    config (less `exclude`: fields that do not change what is trained) and the code of the
    stage's `module`, so a re-run of the same stage finds the checkpoints of a killed run (and a
    run of changed code does not resume from the old code's checkpoints)."""
    key = {name: digest_path(Path(path)) for name, path in inputs.items()}
    key |= {"code": code_digest(module), "cfg": cfg.model_dump(mode="json", exclude=exclude)}
    return project_dir() / "outputs" / f"{stage}-checkpoints" / digest_bytes(
        json.dumps(key, sort_keys=True).encode())


def load_trainable(model_dir: str | Path, device: str, dtype: str, *, nf4: bool = False,
                   double_quant: bool = True) -> Any:
    """The model at `model_dir` to put an adapter on, in `dtype`, or in 4 bits (`nf4`: QLoRA;
    on a CPU through bitsandbytes' generic path, whose dev evaluation would otherwise repack the
    weights and drop training's gradients, tasks/model/compat.py)."""
    if not nf4:
        return load_model(model_dir, device=device, dtype=dtype)
    model = load_model(model_dir, device=device, dtype=dtype,
                       quantization=bnb_config("nf4", double_quant, dtype))
    if not device.startswith("cuda"):
        bnb_generic_cpu_path(model, unpackable_only=False)
    return model


def attention_kernels(device: str):
    """The SDPA kernels training may use: on CUDA, all but cuDNN attention, whose host-side
    cost per call (a plan per sequence length) is paid on every packed batch; PyTorch picks
    flash or memory-efficient attention instead (benchmarks/qlora_profile.py, docs/gpu.md "Fast
    at real scale")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def evaluate_at_end(trainer: Any, device: str) -> bool:
    """Make sure the dev set was evaluated at the last step; whether the training loop did so
    itself (HF evaluates at the last step on its own, transformers' DefaultFlowCallback, and a
    run resumed from a checkpoint of a finished run has done so before it was saved), else
    evaluate now."""
    step = trainer.state.global_step
    if any("eval_loss" in h and h["step"] == step for h in trainer.state.log_history):
        return True
    with attention_kernels(device):
        trainer.evaluate()
    return False


@dataclass(frozen=True)
class Trained:
    """How `train_and_evaluate` went: the Trainer's output (`training_loss`), the seconds of
    `train()`, and whether the loop itself evaluated at its last step."""

    output: Any
    seconds: float
    evaluated_at_end: bool


def control_callbacks(sigterm: "DeferredSigterm") -> list[TrainerCallback]:
    """The callbacks every training here runs with: a progress line per logging step, progress
    for slow work, a checkpoint on SIGTERM, and the test hook after a save."""
    return [ProgressLog(), TrainProgress(), CheckpointOnSigterm(sigterm), PauseAfterSave()]


def train_and_evaluate(trainer: Any, sigterm: "DeferredSigterm", last: str | None,
                       device: str) -> Trained:
    """`trainer.train()`, resumed from checkpoint `last`, under the SIGTERM handler and the
    training attention kernels, timed, with the peak CUDA memory counted from its start; then
    the closing evaluation (`evaluate_at_end`). Trainer's own printing is off: the stages
    return their log history instead."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with sigterm, attention_kernels(device):
        output = trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - start
    return Trained(output, seconds, evaluate_at_end(trainer, device))


def rounded(value: float) -> float:
    """Six significant digits: short in a log line, and a learning rate of 5e-06 stays 5e-06
    (rounding to decimal places showed it as 0.0)."""
    return float(f"{float(value):.6g}")


def resumed_step(last: str | None) -> int:
    """The step of checkpoint folder `last` (`checkpoint-<step>`) a run resumed from; 0: none."""
    return int(last.rsplit("-", 1)[1]) if last else 0


def in_loop_eval_seconds(history: list[dict], last: str | None, evaluated_at_end: bool) -> float:
    """Seconds this run's training loop spent evaluating: the evaluations it logged (not those
    of the run before a resume, nor an `evaluate()` called after `train()` returned)."""
    evals = [h for h in history if "eval_runtime" in h]
    start = resumed_step(last)
    return sum(h["eval_runtime"] for h in (evals if evaluated_at_end else evals[:-1])
               if h["step"] >= start and (last is None or h["step"] > 0))


def log_history(history: list[dict]) -> list[dict]:
    """Trainer's log history reduced to {"step", "loss"} / {"step", "eval_loss"} entries."""
    out, seen = [], set()
    for h in history:
        for key in ("loss", "eval_loss"):
            if key in h and (h["step"], key) not in seen:
                seen.add((h["step"], key))
                out.append({"step": int(h["step"]), key: rounded(h[key])})
    return out


class ProgressLog(TrainerCallback):
    """One log line per logging step (train loss, dev loss, LR), e.g. in the Prefect task log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        shown = {k: rounded(v) for k, v in (logs or {}).items()
                 if k in ("loss", "eval_loss", "learning_rate")}
        if shown and state.is_world_process_zero:
            log.info("step %d/%d %s", state.global_step, state.max_steps, shown)


class TrainProgress(TrainerCallback):
    """The training as one progress line every few seconds (tasks/runtime/progress.py: the console
    shows it; a short training prints none), with the latest train loss."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress = Progress("training", state.max_steps)
            self.progress.update(state.global_step)          # resumed: steps already done

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.loss = (logs or {}).get("loss", self.loss)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(note=None if self.loss is None else f"loss {self.loss:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.close()


class PauseAfterSave(TrainerCallback):
    """The pause point `train:checkpoint` (tasks/runtime/pause.py): a test kills the run right after
    a
    checkpoint was saved, not at a moment it guesses."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            pause_point("train:checkpoint")


class StepTimes(TrainerCallback):
    """Wall time between consecutive optimizer steps (the steady-state step cost: the first
    steps, with their one-off allocations, are left out of `median`)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def median(self, skip: int = 2) -> float | None:
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:])][skip:]
        return statistics.median(gaps) if gaps else None


class DeferredSigterm:
    """Within `with`: SIGTERM only sets `received` (and calls `on_signal`); on leaving the block
    it is re-delivered to the handler that was there before (by default the process dies of
    it). The work in flight stops cleanly -- and still stops. Python handles signals in the main
    thread only; elsewhere this does nothing (a kill then acts at once)."""

    def __init__(self, on_signal: Callable[[], None] | None = None) -> None:
        self.received, self._on_signal, self._previous = False, on_signal, None

    def __enter__(self) -> "DeferredSigterm":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, *_) -> None:
        self.received = True
        if self._on_signal:
            self._on_signal()

    def __exit__(self, exc_type, *_) -> None:
        if self._previous is None:
            return
        signal.signal(signal.SIGTERM, self._previous)
        if self.received and exc_type is None:
            signal.raise_signal(signal.SIGTERM)
            raise RuntimeError("training stopped by SIGTERM after saving a checkpoint; run the "
                               "stage again to resume")


class CheckpointOnSigterm(TrainerCallback):
    """Once SIGTERM was received: checkpoint the step just finished and stop training. Under
    DDP the ranks agree on the step (a flag all-reduced every step), so they save together."""

    def __init__(self, sigterm: DeferredSigterm) -> None:
        self.sigterm = sigterm

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.sigterm.received
        if args.world_size > 1:
            flag = torch.tensor([float(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            log.warning("SIGTERM: saving a checkpoint at step %d and stopping",
                        state.global_step)
            control.should_save = control.should_training_stop = True


def list_checkpoints(ckpt_dir: Path) -> list[dict]:
    """{"name", "step", "path"} of every checkpoint-<step> folder, oldest first."""
    out = []
    for p in sorted(ckpt_dir.glob("checkpoint-*"), key=lambda q: int(q.name.split("-")[1])):
        out.append({"name": p.name, "step": int(p.name.split("-")[1]), "path": str(p)})
    return out


def last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint (its trainer_state.json, written last, parses): a run
    killed while saving leaves a partial one, which is skipped."""
    for c in reversed(list_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []):
        try:
            read_json(Path(c["path"]) / "trainer_state.json")
        except (OSError, ValueError):
            continue
        return c["path"]
    return None
