"""Stage 2, conversations: QA JSON -> ChatGLM3-style conversation JSON, split 70/30.

The split is exact and deterministic: the first round-half-up(n * ratio) records go to
train.json, the rest to dev.json (seed 004's `if i < round(n*0.7)` puts one record too few in
train). An optional seeded shuffle reorders records before the split.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Sequence

from tasks.common import DataError, StageResult, atomic_write_json, publish_dir, read_json, \
    stage_root, staging_dir

Conversation = dict[str, list[dict[str, str]]]


def qa_to_conversation(q: str, a: str, system_prompt: str | None = None) -> Conversation:
    turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
    turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"conversations": turns}


def split_train_dev(records: Sequence[Any], train_ratio: float = 0.7,
                    shuffle_seed: int | None = None) -> tuple[list[Any], list[Any]]:
    """Exact split: train gets round-half-up(n * ratio) records, dev the rest (both non-empty)."""
    records = list(records)
    if len(records) < 2:
        raise ValueError(f"need at least 2 records to split into train and dev, got "
                         f"{len(records)}")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(records)
    n_train = math.floor(len(records) * train_ratio + 0.5)
    n_train = min(max(n_train, 1), len(records) - 1)
    return records[:n_train], records[n_train:]


def build_conversations(qa_json: Path, system_prompt: str | None = None,
                        train_ratio: float = 0.7,
                        shuffle_seed: int | None = None) -> StageResult:
    """QA JSON -> train.json / dev.json conversations under outputs/conversations/<digest>/."""
    qa = read_json(qa_json)
    if not isinstance(qa, list):
        raise DataError(qa_json, f"expected a JSON array of {{'q','a'}} objects, got "
                                 f"{type(qa).__name__}")
    convs = [qa_to_conversation(r["q"], r["a"], system_prompt) for r in qa]
    try:
        train, dev = split_train_dev(convs, train_ratio, shuffle_seed)
    except ValueError as e:
        raise DataError(qa_json, str(e)) from None
    with staging_dir(stage_root("conversations")) as tmp:
        atomic_write_json(tmp / "train.json", train)
        atomic_write_json(tmp / "dev.json", dev)
        out, digest = publish_dir(tmp, stage_root("conversations"))
    return StageResult(stage="conversations", path=str(out), digest=digest,
                       files={"train_json": str(out / "train.json"),
                              "dev_json": str(out / "dev.json")},
                       metrics={"train_records": len(train), "dev_records": len(dev)},
                       info={"train_ratio": train_ratio, "shuffle_seed": shuffle_seed})
