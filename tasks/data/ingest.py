"""Stage 1, ingest: any supported input (see `tasks.data.formats`) -> one table of conversations.

Outputs under outputs/ingest/<digest>/:
    records.arrow    every usable record as a conversation, with its file, line and record
                     number (Arrow IPC: the next stage reads it without parsing anything)
    qa.json          `[{"q", "a"}]`, when every record is one question and one answer (always
                     for raw Q/A text, the first step of README "What each stage produces")
    skipped.json     the malformed records skipped (on_error="skip"), counted by kind
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from tasks.runtime.results import Metrics, StageName, StageResult, stage_entry, stage_output, \
    stage_root
from tasks.runtime.files import atomic_write_json, publish_dir, staging_dir
from tasks.data.dataset_io import is_qa, qa_json, single, write_arrow, write_json_records
from tasks.data.formats import Format, Loaded, read_source
from tasks.runtime.progress import Progress
from tasks.data.sources import Issues, OnError

log = logging.getLogger(__name__)


@stage_output
class Ingested:
    """What ingest made of the user's data: the files above, how many records, turns and input
    files it read, what it skipped and why, and what it ignored."""

    records_arrow: Path
    qa_json: Path | None
    skipped_json: Path | None
    records: int
    turns: int
    input_files: int                        # files of the source read
    skipped_records: int
    qa_pairs: int | None                    # = records where every record is one Q/A pair
    skipped_by_kind: Metrics                # "skipped.<kind>"
    source: str
    format: str
    file_names: list[str]
    ignored_files: list[str]
    ignored_fields: dict[str, int]
    on_error: str
    skipped: dict[str, int]
    skipped_examples: list[dict]


def _relative_names(loaded: Loaded, source: Path) -> list[str]:
    """File names as the data set knows them (relative to a source directory), so moving the
    data elsewhere does not change the output's content address."""
    if source.is_dir():
        return [Path(f).relative_to(source).as_posix() for f in loaded.files]
    return [Path(f).name for f in loaded.files]


@stage_entry(StageName.INGEST)
def ingest(source: Path, fmt: Format = "auto", on_error: OnError = "fail",
           max_chars: int = 100_000) -> StageResult:
    """Read `source` (a file, or a directory of one format) into records.arrow (+ qa.json)."""
    source = Path(source)
    issues = Issues(on_error)
    with Progress(f"ingest {source.name}", total=3) as progress:
        loaded = read_source(source, fmt, on_error=on_error, max_chars=max_chars, issues=issues)
        progress.update(note=f"read {loaded.table.num_rows:,} records")
        return _publish(source, loaded, issues, on_error, progress)


def _publish(source: Path, loaded: Loaded, issues: Issues, on_error: OnError,
             progress: Progress) -> StageResult:
    """records.arrow (+ qa.json, skipped.json) of what was read, published; the stage result."""
    names = _relative_names(loaded, source)
    table = loaded.table.set_column(
        loaded.table.schema.get_field_index("file"), "file",
        pa.DictionaryArray.from_arrays(single(loaded.table.column("file")),
                                       pa.array(names)))
    qa = is_qa(table.column("conversations"))
    if issues.skipped:
        log.warning("%s: skipped %d malformed record(s) (%s); first: %s", source,
                    issues.skipped, dict(issues.counts), issues.examples[0]["message"])
    with staging_dir(stage_root(StageName.INGEST)) as tmp:
        write_arrow(tmp / "records.arrow", table)
        progress.update(note="wrote records.arrow")
        if qa:
            write_json_records(tmp / "qa.json", table.select(["conversations"]), qa_json)
        if issues.skipped:
            atomic_write_json(tmp / "skipped.json", {"counts": dict(issues.counts),
                                                     "examples": issues.examples})
        out, digest = publish_dir(tmp, stage_root(StageName.INGEST))
    turns = pc.list_value_length(table.column("conversations"))
    return StageResult(stage=StageName.INGEST, path=str(out), digest=digest, out=Ingested(
        records_arrow=out / "records.arrow", qa_json=out / "qa.json" if qa else None,
        skipped_json=out / "skipped.json" if issues.skipped else None,
        records=table.num_rows, turns=pc.sum(turns).as_py(), input_files=len(loaded.files),
        skipped_records=issues.skipped, qa_pairs=table.num_rows if qa else None,
        skipped_by_kind={f"skipped.{kind}": float(n) for kind, n in issues.counts.items()},
        source=str(source), format=loaded.format, file_names=names,
        ignored_files=loaded.ignored_files, ignored_fields=loaded.ignored_fields,
        on_error=on_error, skipped=dict(issues.counts), skipped_examples=issues.examples[:20]))
