"""Raw Q/A text (README "What each stage produces", stage 1): blocks of one question line and one answer line, blank lines between.

Unlike the seed's index arithmetic, the parser never silently mis-pairs. It tolerates a BOM,
CRLF/CR line ends, white space around lines and several blank lines between blocks, and
refuses (file:line, plain words) a block it cannot pair or a line longer than `max_chars`.
It works on whole columns (numpy + pyarrow), so a million pairs parse in about a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.runtime.errors import DataError
from tasks.data.dataset_io import TEXT
from tasks.data.sources import Issues, read_text_bytes

QA = dict[str, str]


@dataclass(frozen=True)
class QAColumns:
    """Parsed pairs as one Arrow column of texts, q0, a0, q1, a1, ... (the layout of the
    turns of a conversation table), with the 1-based line of each question."""

    texts: pa.Array
    line: np.ndarray

    @property
    def q(self) -> pa.Array:
        return self.texts.take(np.arange(0, len(self.texts), 2))

    @property
    def a(self) -> pa.Array:
        return self.texts.take(np.arange(1, len(self.texts), 2))


def _lines(raw: bytes) -> pa.Array:
    """Every line of the text, white space around it removed (zero-copy split on b"\\n")."""
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    ends = np.flatnonzero(np.frombuffer(raw, np.uint8) == ord("\n")) + 1
    offsets = np.concatenate(([0], ends, [len(raw)] if len(raw) not in ends[-1:] else []))
    lines = pa.LargeStringArray.from_buffers(len(offsets) - 1, pa.py_buffer(
        offsets.astype(np.int64)), pa.py_buffer(raw))
    return pc.utf8_trim_whitespace(lines)


def parse_qa_bytes(raw: bytes, path: Path | str = "<text>", *, max_chars: int = 100_000,
                   issues: Issues | None = None) -> QAColumns:
    """Parse Q/A blocks from UTF-8 bytes; each block is exactly one question line and one
    answer line. A malformed block raises `DataError`, or is skipped when `issues` skips."""
    issues = issues or Issues()
    lines = _lines(raw)
    size_in_bytes = pc.binary_length(lines).to_numpy(zero_copy_only=False)
    edges = np.diff((size_in_bytes > 0).astype(np.int8), prepend=0, append=0)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    size = ends - starts
    bad = size != 2
    # a line of more than max_chars bytes may still be short enough in characters
    long_bytes = np.flatnonzero(size_in_bytes > max_chars)
    chars = pc.utf8_length(lines.take(long_bytes)).to_numpy(zero_copy_only=False)
    too_long = long_bytes[chars > max_chars]
    long_block = np.searchsorted(starts, too_long, side="right") - 1
    bad[long_block] = True
    first_long = dict(zip(long_block[::-1].tolist(), too_long[::-1].tolist()))
    for b in np.flatnonzero(bad).tolist():
        first = int(starts[b])
        if b in first_long:
            at = first_long[b]
            issues.report("too-long", DataError(
                path, f"line is {len(lines[at].as_py()):,} characters long, more than "
                      f"max_chars={max_chars:,} (a file without line breaks, or the wrong "
                      "file?)", line=at + 1))
        elif size[b] == 1:
            issues.report("no-answer", DataError(
                path, f"question {lines[first].as_py()[:40]!r} has no answer line (a blank "
                      "line or the end of the file follows it)", line=first + 1))
        else:
            issues.report("extra-lines", DataError(
                path, f"block has {size[b]} lines; expected exactly a question line and an "
                      "answer line (put each answer on one line, and a blank line between "
                      f"blocks; line {first + 3} is extra)", line=first + 1))
    q_at = starts[~bad]
    keep = np.zeros(len(lines), bool)
    keep[q_at] = keep[q_at + 1] = True
    return QAColumns(texts=lines.filter(keep).cast(TEXT), line=q_at + 1)


def parse_qa_text(text: str, path: Path | str = "<text>", *, max_chars: int = 100_000
                  ) -> list[QA]:
    """Parse Q/A blocks from a string into `[{"q", "a"}]` (see `parse_qa_bytes`)."""
    cols = parse_qa_bytes(text.removeprefix("\ufeff").encode("utf-8"), path,
                          max_chars=max_chars)
    if not len(cols.texts):
        raise DataError(path, "no Q/A blocks found")
    texts = cols.texts.to_pylist()
    return [{"q": q, "a": a} for q, a in zip(texts[0::2], texts[1::2])]


def read_qa_text(path: Path, *, max_chars: int = 100_000) -> list[QA]:
    """Read and parse a raw Q/A text file into `[{"q", "a"}]`."""
    path = Path(path)
    return parse_qa_text(read_text_bytes(path).decode("utf-8"), path, max_chars=max_chars)
