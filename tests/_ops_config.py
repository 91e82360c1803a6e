"""The tiny pipeline config of the operations tests (nightly gate, stack + browser): the real
flows end to end, small enough for CI's 2 cores (about two minutes for a cold full run); and
corpora of a test's own."""

from __future__ import annotations

from typing import Any

from tasks.runtime.paths import REPO_DIR
from tasks.runtime.results import StageName

SAMPLE = REPO_DIR / "data" / "sample" / "plant_care_qa.txt"

TINY: dict[str, Any] = {
    "base": {"vocab_size": 300, "hidden_size": 64, "num_layers": 2, "num_heads": 2,
             "max_seq_len": 64, "pretrain_epochs": 4, "learning_rate": 0.005},
    "train": {"epochs": 1, "batch_size": 16, "max_length": 64, "eval_steps": 50},
    "benchmark": {"prompts": 1, "new_tokens": 2, "warmup": 0, "cpu_threads": 1, "repeats": 1},
    "report": {"dev_examples": 1, "eval_examples": 2, "max_new_tokens": 8},
}



def stage_names(*, preference: bool = False) -> list[str]:
    """The stages a LoRA run on a CPU computes, in order (README "What each stage produces"):
    `base` whether the base is built (the embedded default), a folder used where it is, or a
    ChatGLM folder converted; no torchao int4 model on a CPU; the preference stages only with
    `preference`."""
    s = StageName
    data = [s.INGEST, s.CONVERSATIONS, s.VALIDATE, s.DATA_REPORT]
    tuned = [s.BASE, s.TRAIN, s.MERGE]
    if preference:
        return [*data, s.PREFERENCE_DATA, *tuned, s.PREFERENCE, s.MERGE_PREFERENCE, s.QUANTIZE,
                s.BENCHMARK, s.GENERATIONS, s.PREFERENCE_EVAL, s.REPORT]
    return [*data, *tuned, s.QUANTIZE, s.BENCHMARK, s.GENERATIONS, s.REPORT]


PIPELINE_STAGES = set(stage_names())


def tiny(**sections: dict[str, Any]) -> dict[str, Any]:
    """TINY with some fields changed, e.g. tiny(train={"seed": 7})."""
    out = {k: dict(v) for k, v in TINY.items()}
    for section, fields in sections.items():
        if isinstance(fields, dict):
            out.setdefault(section, {}).update(fields)
        else:
            out[section] = fields
    return out


def first_answer_marked(mark: str, text: str | None = None) -> str:
    """A Q/A corpus (the sample's, unless `text`) with `mark` appended to its first answer: the
    same records, but a corpus of a test's own, on which no stage another test computed on the
    sample is a cache hit (stages are cached by content, and the session shares one cache)."""
    question, answer, rest = (text or SAMPLE.read_text(encoding="utf-8")).split("\n", 2)
    return f"{question}\n{answer}{mark}\n{rest}"
