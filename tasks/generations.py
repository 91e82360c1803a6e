"""Stage "generations": base and tuned model answer the same dev prompts and out-of-domain
probes, and the dev answers are scored. This is the costly half of the before/after comparison
users of QLoRA tutorials expect ("微调前后推理对比"), with checks for catastrophic forgetting
("灾难性遗忘"). The report stage (tasks/report.py) renders it, so a new benchmark table
re-renders the report without generating again (README "Caching").

Greedy decoding, one model in memory at a time; the dev answers are scored against the
references with ROUGE-1/2/L F1 (rouge-chinese on jieba words) and BLEU-4 (nltk, characters,
smoothing method3), as ChatGLM's ptuning main.py and LLaMA-Factory do. Output:
generations.json (every prompt, reference, answer and score; the report's input)."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import jieba
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from tasks.common import DataError, StageResult, atomic_write_json, publish_dir, read_json, \
    stage_root, staging_dir
from tasks.config import ReportConfig
from tasks.model_spec import ModelSpec
from tasks.modeling import Message, answer, load_tokenizer, pick_device, release

jieba.setLogLevel(logging.WARNING)
SCORES = {"rouge_1": "ROUGE-1", "rouge_2": "ROUGE-2", "rouge_l": "ROUGE-L", "bleu_4": "BLEU-4"}
_ROUGE = Rouge()
#: a CPU model below this size decodes faster on one thread: its per-token matmuls are too small
#: to split, and on 2 busy cores intra-op threads made decoding ~8x slower (75 vs 9.6 ms/token)
SMALL_MODEL_PARAMS = 50_000_000


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def score_answer(hypothesis: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 and BLEU-4 of one answer, each in [0, 100]; an empty answer scores 0."""
    hyp = " ".join(jieba.cut(hypothesis.strip()))
    ref = " ".join(jieba.cut(reference.strip()))
    scores = dict.fromkeys(SCORES, 0.0)
    if not hyp.split() or not ref.split():
        return scores
    try:
        rouge = _ROUGE.get_scores(hyp, ref)[0]
    except ValueError:                      # e.g. text that rouge-chinese splits into nothing
        rouge = None
    if rouge:
        for key, name in (("rouge_1", "rouge-1"), ("rouge_2", "rouge-2"), ("rouge_l", "rouge-l")):
            scores[key] = 100.0 * rouge[name]["f"]
    with warnings.catch_warnings():         # nltk warns about zero n-gram overlaps
        warnings.simplefilter("ignore")
        scores["bleu_4"] = 100.0 * sentence_bleu([list(reference.strip())],
                                                 list(hypothesis.strip()),
                                                 smoothing_function=SmoothingFunction().method3)
    return scores


def mean_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Average of `score_answer` over aligned answers (0 for an empty list)."""
    rows = [score_answer(h, r) for h, r in zip(hypotheses, references, strict=True)]
    return {k: sum(r[k] for r in rows) / len(rows) if rows else 0.0 for k in SCORES}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def read_dev_prompts(dev_json: Path) -> list[tuple[list[Message], str]]:
    """(prompt messages, reference) per record: the conversation up to its LAST assistant turn
    (system and earlier turns included) and that turn's content."""
    data = read_json(dev_json)
    if not isinstance(data, list) or not data:
        raise DataError(dev_json, "expected a non-empty JSON array of {'conversations': [...]} "
                                  "records")
    out = []
    for i, rec in enumerate(data):
        turns = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(turns, list) or not all(
                isinstance(t, dict) and isinstance(t.get("role"), str)
                and isinstance(t.get("content"), str) for t in turns):
            raise DataError(dev_json, "expected {'conversations': [{'role', 'content'}, ...]}",
                            record=i)
        last = max((j for j, t in enumerate(turns) if t["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise DataError(dev_json, "needs an assistant turn after at least one other turn",
                            record=i)
        out.append(([{"role": t["role"], "content": t["content"]} for t in turns[:last]],
                    turns[last]["content"]))
    return out


def read_probes(probes_file: Path) -> list[str]:
    """One question per line; blank lines ignored."""
    path = Path(probes_file)
    if not path.is_file():
        raise DataError(path, "probe file not found")
    probes = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    probes = [p for p in probes if p]
    if not probes:
        raise DataError(path, "no probe questions: expected one question per line")
    return probes


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def answer_prompts(spec: ModelSpec, prompts: list[list[Message]], max_new_tokens: int
                   ) -> dict[str, Any]:
    """Load one model from its spec (on the GPU where there is one), answer every prompt
    greedily (`tasks.modeling.answer`), free it again. `new_tokens` counts each answer's tokens,
    its EOS included, so "ended with eos before max_new_tokens" is exact."""
    device = pick_device("auto")
    model = spec.load(device)
    tokenizer = load_tokenizer(spec.tokenizer_dir())
    threads = torch.get_num_threads()
    if (next(model.parameters()).device.type == "cpu"
            and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS):
        torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        answers = answer(model, tokenizer, prompts, max_new_tokens)
    finally:
        seconds = time.perf_counter() - start
        torch.set_num_threads(threads)
        del model
        release(device)
    return {"answers": [a.text for a in answers], "new_tokens": [a.new_tokens for a in answers],
            "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def generate_answers(base: ModelSpec, tuned: ModelSpec, dev_json: Path, probes_file: Path,
                     cfg: ReportConfig) -> StageResult:
    """`base` and `tuned` answer the dev prompts and the probes; the dev answers are scored ->
    outputs/generations/<digest>/generations.json."""
    dev = read_dev_prompts(Path(dev_json))
    probes = read_probes(Path(probes_file))
    n_show, n_eval = min(cfg.dev_examples, len(dev)), min(cfg.eval_examples, len(dev))
    used = dev[:max(n_show, n_eval)]
    prompts = [p for p, _ in used] + [[{"role": "user", "content": q}] for q in probes]

    runs = {"base": answer_prompts(base, prompts, cfg.max_new_tokens),
            "tuned": answer_prompts(tuned, prompts, cfg.max_new_tokens)}
    dev_ans = {k: r["answers"][:len(used)] for k, r in runs.items()}
    probe_ans = {k: r["answers"][len(used):] for k, r in runs.items()}
    refs = [r for _, r in used]
    per_prompt = {k: [score_answer(a, ref) for a, ref in zip(v, refs)] for k, v in dev_ans.items()}

    metrics: dict[str, float] = {"dev_examples": float(n_show), "eval_examples": float(n_eval),
                                 "probe_count": float(len(probes))}
    for k, r in runs.items():
        for key in SCORES:
            metrics[f"{k}_{key}"] = (sum(s[key] for s in per_prompt[k][:n_eval]) / n_eval)
        metrics[f"{k}_mean_answer_chars"] = sum(map(len, r["answers"])) / len(r["answers"])
        metrics[f"{k}_mean_new_tokens"] = sum(r["new_tokens"]) / len(r["new_tokens"])
        metrics[f"{k}_eos_rate"] = (sum(n < cfg.max_new_tokens for n in r["new_tokens"])
                                    / len(r["new_tokens"]))
        metrics[f"{k}_generate_seconds"] = r["seconds"]

    examples = [{"prompt": p, "reference": ref, "before": dev_ans["base"][i],
                 "after": dev_ans["tuned"][i], "scored": i < n_eval,
                 "scores": {"base": per_prompt["base"][i], "tuned": per_prompt["tuned"][i]}}
                for i, (p, ref) in enumerate(used)]
    probe_rows = [{"question": q, "before": probe_ans["base"][i], "after": probe_ans["tuned"][i]}
                  for i, q in enumerate(probes)]
    root = stage_root("generations")
    with staging_dir(root) as tmp:
        atomic_write_json(tmp / "generations.json", {
            "base": base.describe(), "tuned": tuned.describe(),
            "labels": {"base": base.label(), "tuned": tuned.label()},
            "max_new_tokens": cfg.max_new_tokens, "dev_examples": n_show,
            "eval_examples": n_eval, "dev": examples, "probes": probe_rows,
            "scores": {k: {key: metrics[f"{k}_{key}"] for key in SCORES} for k in runs},
            "metrics": metrics})
        out, digest = publish_dir(tmp, root)
    return StageResult(stage="generations", path=str(out), digest=digest,
                       files={"generations_json": str(out / "generations.json")},
                       metrics=metrics, device=pick_device())
