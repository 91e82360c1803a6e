"""The dev set the before/after comparison and the champion gate answer, and how an answer is
scored: ROUGE-1/2/L F1 (rouge-chinese on jieba words) and BLEU-4 (nltk, characters, smoothing
method3), as ChatGLM's ptuning main.py and LLaMA-Factory do.

Plain Python: a flow imports it at start-up without torch, and the scorers themselves are
imported on first use (tasks/evaluate/generations.py, tasks/evaluate/gate.py)."""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

from tasks.runtime.errors import DataError
from tasks.runtime.files import read_json

SCORES = {"rouge_1": "ROUGE-1", "rouge_2": "ROUGE-2", "rouge_l": "ROUGE-L", "bleu_4": "BLEU-4"}
#: the models generations.json compares, in order, and the column of each one's answers
#: (tasks/evaluate/generations.py; their scores and metrics are under the model's name:
#: `scores.base`, `tuned_rouge_l`)
COLUMNS = {"base": "before", "supervised": "supervised", "tuned": "after"}


@functools.cache
def _scorers() -> tuple[Any, Any, Any, Any]:
    """jieba, a rouge-chinese scorer, nltk's sentence_bleu and its smoothing (about 2 s to
    import, so only where answers are scored)."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)
    return jieba, Rouge(), sentence_bleu, SmoothingFunction().method3


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def score_answer(hypothesis: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 and BLEU-4 of one answer, each in [0, 100]; an empty answer scores 0."""
    jieba, rouge, sentence_bleu, smoothing = _scorers()
    hyp = " ".join(jieba.cut(hypothesis.strip()))
    ref = " ".join(jieba.cut(reference.strip()))
    scores = dict.fromkeys(SCORES, 0.0)
    if not hyp.split() or not ref.split():
        return scores
    try:
        overlap = rouge.get_scores(hyp, ref)[0]
    except ValueError:                      # e.g. text that rouge-chinese splits into nothing
        overlap = None
    if overlap:
        for key, name in (("rouge_1", "rouge-1"), ("rouge_2", "rouge-2"), ("rouge_l", "rouge-l")):
            scores[key] = 100.0 * overlap[name]["f"]
    with warnings.catch_warnings():         # nltk warns about zero n-gram overlaps
        warnings.simplefilter("ignore")
        scores["bleu_4"] = 100.0 * sentence_bleu([list(reference.strip())],
                                                 list(hypothesis.strip()),
                                                 smoothing_function=smoothing)
    return scores


def average(per_prompt: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each score's mean over the prompts' `score_answer` results (0 for none)."""
    return {k: sum(s[k] for s in per_prompt) / len(per_prompt) if per_prompt else 0.0
            for k in SCORES}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def read_dev_prompts(dev_json: Path) -> list[tuple[list[dict[str, str]], str]]:
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
