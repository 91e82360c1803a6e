"""Stage 2, conversations: ingested records -> ChatGLM3 conversation JSON, split train/dev.

* an optional system prompt starts every conversation that has no system turn;
* exact duplicates (same turns, same texts) are dropped (default), kept, or refused;
* the split is exact and deterministic: train gets round-half-up(n * ratio) records, dev the
  rest (the common `if i < round(n*0.7)` loop puts one record too few in train); an optional seeded
  shuffle reorders records first. `split_by="question"` keeps every record of one question
  (first user turn) on one side, so no question leaks from train into dev: then the split is as
  close to the ratio as whole groups allow.

Outputs under outputs/conversations/<digest>/: train.json, dev.json (one record per line inside
a JSON array), train.parquet, dev.parquet, and duplicates.json when any were dropped.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.runtime.errors import DataError
from tasks.runtime.results import Info, StageName, StageResult, stage_entry, stage_output, \
    stage_root
from tasks.runtime.files import atomic_write_json, publish_dir, staging_dir
from tasks.data.dataset_io import (
    CONVERSATIONS,
    conversations_array,
    read_arrow,
    single,
    string_bytes,
    text_array,
    turns,
    write_json_records,
    write_parquet,
)
from tasks.runtime.progress import Progress

Conversation = dict[str, list[dict[str, str]]]
Duplicates = Literal["drop", "keep", "fail"]
SplitBy = Literal["record", "question"]
ROLES = ("system", "user", "assistant")
log = logging.getLogger(__name__)


@stage_output
class Conversations:
    """The train/dev split as ChatGLM3 conversations (JSON and Parquet), its counts, and how it
    was made."""

    train_json: Path
    dev_json: Path
    train_parquet: Path
    dev_parquet: Path
    duplicates_json: Path | None            # what was dropped as a duplicate, if anything
    train_records: int
    dev_records: int
    duplicates: int
    duplicates_dropped: int
    question_groups: int | None             # split_by="question"
    train_ratio: Info[float]
    shuffle_seed: Info[int | None]
    split_by: str
    duplicates_policy: str
    system_prompt: str | None
    duplicate_examples: list[dict]


def qa_to_conversation(q: str, a: str, system_prompt: str | None = None) -> Conversation:
    turns_ = [{"role": "system", "content": system_prompt}] if system_prompt else []
    turns_ += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"conversations": turns_}


# ---------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------
def n_train_of(n: int, train_ratio: float) -> int:
    """round-half-up(n * ratio), kept within [1, n - 1] so both sides get a record."""
    return min(max(math.floor(n * train_ratio + 0.5), 1), n - 1)


def split_indices(n: int, train_ratio: float = 0.7, shuffle_seed: int | None = None,
                  groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Record indices of train and dev. Without `groups`: exact (see `n_train_of`), in file
    order or seeded-shuffled order. With `groups` (a group id per record): whole groups, in
    order of first appearance (or shuffled), cut where the train size is closest to exact."""
    if n < 2:
        raise ValueError(f"need at least 2 records to split into train and dev, got {n}")
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    if groups is None:
        order = rng.permutation(n) if rng is not None else np.arange(n)
        cut = n_train_of(n, train_ratio)
        return order[:cut], order[cut:]
    _, first, inverse, sizes = np.unique(groups, return_index=True, return_inverse=True,
                                         return_counts=True)
    if len(sizes) < 2:
        raise ValueError("every record has the same question: cannot split by question")
    rank = np.argsort(np.argsort(first))                 # groups in order of first appearance
    if rng is not None:
        rank = rng.permutation(len(sizes))[rank]
    order = np.argsort(rank[inverse] * n + np.arange(n), kind="stable")
    ends = np.cumsum(sizes[np.argsort(rank)])[:-1]       # train sizes at each group boundary
    cut = int(ends[np.argmin(np.abs(ends - n * train_ratio))])
    return order[:cut], order[cut:]


def split_train_dev(records: Sequence[Any], train_ratio: float = 0.7,
                    shuffle_seed: int | None = None) -> tuple[list[Any], list[Any]]:
    """Exact split of a list (see `split_indices`)."""
    records = list(records)
    train, dev = split_indices(len(records), train_ratio, shuffle_seed)
    return [records[i] for i in train], [records[i] for i in dev]


# ---------------------------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------------------------
def with_system_prompt(conversations: pa.Array, prompt: str | None) -> pa.Array:
    """Put a system turn with `prompt` first in every conversation that has none."""
    offsets, roles, contents = turns(conversations)
    if not prompt or len(offsets) < 2:
        return conversations
    add = ~pc.equal(roles.take(offsets[:-1]), "system").to_numpy(zero_copy_only=False)
    new_offsets = offsets + np.concatenate(([0], np.cumsum(add)))
    # an old turn moves right by the system turns inserted up to its own conversation; each
    # new system turn takes an extra element appended after the old turns
    moved = np.arange(len(roles)) + np.repeat(np.cumsum(add), np.diff(offsets))
    index = np.empty(new_offsets[-1], np.int64)
    index[moved] = np.arange(len(roles))
    index[new_offsets[:-1][add]] = len(roles)
    roles = pa.concat_arrays([roles, text_array(["system"])]).take(index)
    contents = pa.concat_arrays([contents, text_array([prompt])]).take(index)
    return conversations_array(new_offsets, roles, contents)


def first_identical(conversations: pa.Array) -> np.ndarray:
    """For each conversation, the index of the first one with the same turns (same roles,
    same texts): itself unless it is an exact duplicate of an earlier one."""
    offsets, roles, contents = turns(conversations)
    text_at, _ = string_bytes(contents)
    # the texts of one conversation are contiguous: look each conversation's bytes up once
    # (a dict of bytes: exact, and faster here than Arrow's hash kernels), then confirm
    # candidate pairs turn by turn (the same bytes cut differently, or with other roles, is
    # not a duplicate)
    whole = pa.Array.from_buffers(pa.large_binary(), len(offsets) - 1, [
        None, pa.py_buffer(np.ascontiguousarray(text_at[offsets])), contents.buffers()[2]])
    seen: dict[bytes, int] = {}
    first_of = np.fromiter((seen.setdefault(b, i) for i, b in enumerate(whole.to_pylist())),
                           np.int64, count=len(whole))
    del seen
    rows = np.flatnonzero(first_of != np.arange(len(first_of)))
    if len(rows):
        role = pc.index_in(roles, text_array(ROLES)).to_numpy(zero_copy_only=False)
        signature = role.astype(np.int64) * (1 << 40) + np.diff(text_at)  # role, length
        sizes = np.diff(offsets)
        same = sizes[rows] == sizes[first_of[rows]]
        for k in range(int(sizes[rows].max())):                  # turns of the candidates
            has = same & (k < sizes[rows])
            same[has] &= signature[offsets[rows[has]] + k] == \
                signature[offsets[first_of[rows[has]]] + k]
        if not same.all():                      # rare: settle it exactly, record by record
            exact: dict[tuple, int] = {}
            first_of = np.array([exact.setdefault(tuple((t["role"], t["content"]) for t in c),
                                                  i) for i, c in enumerate(
                conversations.to_pylist())])
    return first_of


def first_question(conversations: pa.Array) -> pa.Array:
    """The first user turn of each conversation, white space trimmed (the split group)."""
    offsets, roles, contents = turns(conversations)
    starts = offsets[:-1]
    first_is_system = pc.equal(roles.take(starts), "system").to_numpy(zero_copy_only=False)
    return pc.utf8_trim_whitespace(contents.take(starts + first_is_system))


def _origin(table: pa.Table, i: int) -> tuple[str, int | None, int | None]:
    """(file, line, record) an ingested record came from (a line makes the record number
    redundant)."""
    file, line, record = (table.column(c)[i].as_py() for c in ("file", "line", "record"))
    return file, line, None if line is not None else record


def _where(table: pa.Table, i: int) -> str:
    file, line, record = _origin(table, i)
    return f"{file}:{line}" if line is not None else f"{file} record #{record}"


def _source_file(source: Path | None, name: str) -> str:
    """Where a record's file is, as the user knows it: under the source directory, or the
    source file itself (records.arrow keeps names relative to the source)."""
    if source is None:
        return name
    return str(Path(source) / name) if Path(source).is_dir() else str(source)


def _too_few_hint(dropped: int, skipped: int) -> str:
    if dropped:
        return (f"{dropped} exact duplicate record(s) were dropped; set data.duplicates=keep "
                "to keep them, or add records")
    if skipped:
        return (f"{skipped} malformed record(s) were skipped (data.on_error=skip): fix them "
                "(see the warning above for the first one), or add records")
    return "a train/dev split needs at least 2 records (more, to learn anything)"


def build_conversations(records_arrow: Path, system_prompt: str | None = None,
                        train_ratio: float = 0.7, shuffle_seed: int | None = None,
                        split_by: SplitBy = "record", duplicates: Duplicates = "drop", *,
                        source: Path | None = None, skipped: int = 0) -> StageResult:
    """records.arrow (from ingest) -> train/dev conversation JSON (+ Parquet copies). `source`
    (the user's input) and `skipped` (records ingest skipped) only make errors clearer."""
    progress = Progress("conversations", total=3)         # split, train written, dev written
    table = read_arrow(records_arrow)
    convs = with_system_prompt(single(table.column("conversations")), system_prompt)
    first_of = first_identical(convs)
    dup_rows = np.flatnonzero(first_of != np.arange(len(first_of)))
    examples = [{"record": _where(table, i), "duplicate_of": _where(table, int(first_of[i]))}
                for i in dup_rows[:200].tolist()]
    if examples and duplicates == "fail":
        file, line, record = _origin(table, int(dup_rows[0]))
        raise DataError(_source_file(source, file), f"this record is an exact duplicate of "
                        f"{examples[0]['duplicate_of']} (duplicates=fail)", line=line,
                        record=record, hint="remove it, or set data.duplicates=drop (or keep)")
    dropped = len(dup_rows) if duplicates == "drop" else 0
    if dropped:
        log.warning("dropped %d exact duplicate records; first: %s duplicates %s", dropped,
                    examples[0]["record"], examples[0]["duplicate_of"])
        convs = convs.filter(pa.array(first_of == np.arange(len(first_of))))
    groups = None
    if split_by == "question":
        groups = pc.dictionary_encode(first_question(convs)).indices.to_numpy()
    try:
        train_at, dev_at = split_indices(len(convs), train_ratio, shuffle_seed, groups)
    except ValueError as e:
        hint = _too_few_hint(dropped, skipped) if len(convs) < 2 else \
            "set data.split_by=record"
        raise DataError(source or records_arrow, str(e), hint=hint) from None
    parts = {"train": pa.Table.from_arrays([convs.take(train_at)], schema=CONVERSATIONS),
             "dev": pa.Table.from_arrays([convs.take(dev_at)], schema=CONVERSATIONS)}
    del table, convs                                      # the split copies are all we need
    progress.update(note=f"{len(train_at):,} train and {len(dev_at):,} dev records")
    with progress, staging_dir(stage_root(StageName.CONVERSATIONS)) as tmp:
        def write(name: str) -> str:
            write_json_records(tmp / f"{name}.json", parts[name])
            write_parquet(tmp / f"{name}.parquet", parts[name])
            return name
        with ThreadPoolExecutor(2) as pool:               # Arrow kernels release the GIL
            for name in pool.map(write, parts):
                progress.update(note=f"wrote {name}")
        if dropped:
            atomic_write_json(tmp / "duplicates.json", {"dropped": dropped,
                                                        "examples": examples})
        out, digest = publish_dir(tmp, stage_root(StageName.CONVERSATIONS))
    return StageResult(stage=StageName.CONVERSATIONS, path=str(out), digest=digest,
                       out=Conversations(
        train_json=out / "train.json", dev_json=out / "dev.json",
        train_parquet=out / "train.parquet", dev_parquet=out / "dev.parquet",
        duplicates_json=out / "duplicates.json" if dropped else None,
        train_records=len(train_at), dev_records=len(dev_at), duplicates=len(dup_rows),
        duplicates_dropped=dropped,
        question_groups=int(groups.max() + 1) if groups is not None else None,
        train_ratio=train_ratio, shuffle_seed=shuffle_seed, split_by=split_by,
        duplicates_policy=duplicates, system_prompt=system_prompt,
        duplicate_examples=examples[:20]))


@stage_entry(StageName.CONVERSATIONS, ignore=("source",))
def stage(qa: StageResult, system_prompt: str | None, train_ratio: float,
          shuffle_seed: int | None, split_by: str = "record", duplicates: str = "drop",
          source: str | None = None) -> StageResult:
    """The stage over the ingest stage's records; `source`: the user's input, named in errors
    (not part of the cache key)."""
    return build_conversations(qa.out.records_arrow, system_prompt, train_ratio, shuffle_seed,
                               split_by, duplicates, source=source,
                               skipped=qa.out.skipped_records)
