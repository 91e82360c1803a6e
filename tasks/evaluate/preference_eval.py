"""Stage "preference_eval": does a model prefer the chosen answer? (README "Preference
tuning"). For every dev pair, the log-probability each model gives the chosen and the rejected
answer after the prompt, in the model's chat template (the answer's tokens, its closing
end-of-turn included). A model's **preference accuracy** is the share of pairs where the chosen
answer is the more likely per token -- length-normalised, so that a shorter answer does not win
for being short (SimPO's reward, Meng et al. 2024, https://arxiv.org/abs/2405.14734) -- and its
**margin** the mean difference of the two (nats per token). The same on the summed
log-probabilities (`accuracy_sum`, `margin_sum`): where the chosen answer is the longer one, as
in the sample's pairs, the sum prefers the rejected answer whatever the model learnt. Measured
for the base, the supervised and the preference-tuned model, on the same pairs, without a
reference model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq

from tasks.model.model_spec import ModelSpec
from tasks.model.modeling import load_tokenizer, pick_device, release
from tasks.runtime.files import atomic_write_json, publish_dir, read_json, staging_dir
from tasks.runtime.results import Metrics, StageName, StageResult, stage_entry, stage_output, \
    stage_root
from tasks.train.train_data import IGNORE, encode_conversation

MAX_LENGTH = 1024


@stage_output
class PreferenceScores:
    """Each model's preference accuracy and margin on the dev pairs: `scores` holds
    "<model>_preference_accuracy", "_margin" and "_accuracy_sum"."""

    preference_eval_json: Path
    scores: Metrics


@torch.inference_mode()
def answer_logps(model: Any, tok: Any, pairs: list[dict], batch_size: int = 8,
                 device: str = "cpu") -> torch.Tensor:
    """(pairs, 2, 2): per pair, of the chosen and of the rejected answer, the summed
    log-probability and the answer's number of tokens."""
    rows = [{k: v for k, v in encode_conversation(
                tok, p["prompt"] + [{"role": "assistant", "content": p[side]}], MAX_LENGTH,
                last_turn_only=True).items()                  # the answer, not the history
             if k in ("input_ids", "labels")}
            for p in pairs for side in ("chosen", "rejected")]
    tok.padding_side = "right"                   # as trained (tasks/train/train.py)
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE)
    out = []
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i:i + batch_size]).to(device)
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0)[..., None])[..., 0]
        scored = (target != IGNORE).float()
        out.append(torch.stack([(logp * scored).sum(-1), scored.sum(-1)], -1).cpu())
    return torch.cat(out).view(len(pairs), 2, 2)


def preference_scores(spec: ModelSpec, pairs: list[dict], batch_size: int = 8
                      ) -> dict[str, Any]:
    """Preference accuracy and margin of one model on `pairs` (the module docstring)."""
    device = pick_device("auto")
    model = spec.load(device)
    logps = answer_logps(model, load_tokenizer(spec.tokenizer_dir()), pairs, batch_size, device)
    del model
    release(device)
    total, tokens = logps[..., 0], logps[..., 1]
    per_token = (total / tokens.clamp_min(1))
    diff, diff_sum = per_token[:, 0] - per_token[:, 1], total[:, 0] - total[:, 1]
    return {"accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean()),
            "accuracy_sum": float((diff_sum > 0).float().mean()),
            "margin_sum": float(diff_sum.mean()),
            "per_pair": [round(float(d), 4) for d in diff]}


def evaluate_preferences(models: dict[str, ModelSpec], dev_pairs: Path, batch_size: int = 8,
                         stage: StageName = StageName.PREFERENCE_EVAL) -> StageResult:
    """Preference accuracy and margin of each of `models` (name -> spec) on the dev pairs ->
    outputs/<stage>/<digest>/preference_eval.json (the nightly gate scores its champion as
    stage evaluate_champion_preference)."""
    pairs = read_json(Path(dev_pairs))
    scores = {name: preference_scores(spec, pairs, batch_size) for name, spec in models.items()}
    metrics = {}
    for name, s in scores.items():
        metrics |= {f"{name}_preference_accuracy": s["accuracy"],
                    f"{name}_preference_margin": s["margin"],
                    f"{name}_preference_accuracy_sum": s["accuracy_sum"]}
    root = stage_root(stage)
    with staging_dir(root) as tmp:
        atomic_write_json(tmp / "preference_eval.json", {
            "pairs": len(pairs), "models": {n: m.describe() for n, m in models.items()},
            "scores": scores})
        out, digest = publish_dir(tmp, root)
    return StageResult(stage=stage, path=str(out), digest=digest, device=pick_device("auto"),
                       summary=summary(scores, len(pairs)), out=PreferenceScores(
        preference_eval_json=out / "preference_eval.json", scores=metrics))


@stage_entry(StageName.PREFERENCE_EVAL, model_libs=True, own_process=True)
def stage(models: dict[str, ModelSpec], pairs: StageResult) -> StageResult:
    """The stage: each model's preference accuracy on the preference_data stage's dev pairs."""
    return evaluate_preferences(models, pairs.out.dev_pairs_json)


@stage_entry(StageName.EVALUATE_CHAMPION_PREFERENCE, model_libs=True, own_process=True)
def champion_preference_stage(spec: ModelSpec, pairs: StageResult) -> StageResult:
    """The nightly gate's stage: the champion's preference accuracy on the run's dev pairs
    (the challenger's is the preference_eval stage's)."""
    return evaluate_preferences({"champion": spec}, pairs.out.dev_pairs_json,
                                stage=StageName.EVALUATE_CHAMPION_PREFERENCE)


def summary(scores: dict[str, dict[str, Any]], pairs: int) -> str:
    """The report's "Preference" section: accuracy and margin per model."""
    lines = [f"Preference accuracy on {pairs} dev pairs: how often a model gives the chosen "
             "answer a higher log-probability per token than the rejected one; margin: the "
             "mean difference of the two (nats per token). Summed over the answer's tokens "
             "instead, the longer answer is penalised for its length.", "",
             "| model | preference accuracy | margin | accuracy, summed log-prob | "
             "margin, summed |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {s['accuracy']:.1%} | {s['margin']:+.3f} | {s['accuracy_sum']:.1%} "
              f"| {s['margin_sum']:+.1f} |" for name, s in scores.items()]
    return "\n".join(lines)
