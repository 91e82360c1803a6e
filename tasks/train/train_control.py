"""Process control around the HF Trainer of the train stage: a progress line per logging step,
SIGTERM turned into "checkpoint this step and stop", and the checkpoints on disk.

Kept apart from tasks/train/train.py, which says what is trained; this says how a run behaves when
it is watched, stopped and resumed.
"""

from __future__ import annotations

import logging
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import TrainerCallback

from tasks.runtime.files import read_json
from tasks.runtime.pause import pause_point
from tasks.runtime.progress import Progress

log = logging.getLogger("tasks.train")      # the train stage's log (also under torchrun)


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
