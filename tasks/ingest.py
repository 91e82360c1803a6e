"""Stage 1, ingest: raw text of `question\\nanswer\\n\\n` blocks (seed 004) -> QA JSON.

Unlike the seed's index arithmetic, the parser never silently mis-pairs: it tolerates a BOM,
CRLF/CR line ends, trailing white space and several blank lines between blocks, and refuses
(file:line, plain words) anything it cannot pair.
"""

from __future__ import annotations

from pathlib import Path

from tasks.common import DataError, StageResult, atomic_write_json, publish_dir, stage_root, \
    staging_dir

QA = dict[str, str]


def _decode(path: Path, raw: bytes) -> str:
    if not raw.strip():
        raise DataError(path, "the file is empty: expected blocks of a question line and an "
                              "answer line separated by blank lines")
    if b"\0" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\0")) + 1
        raise DataError(path, "contains a NUL byte (binary file, or UTF-16 text?): save it as "
                              "UTF-8 text", line=line)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(path, f"is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                              f"{e.start}): save the file as UTF-8", line=line) from None


def parse_qa_text(text: str, path: Path | str = "<text>") -> list[QA]:
    """Parse Q/A blocks; each block is exactly one question line and one answer line."""
    lines = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    pairs: list[QA] = []
    block: list[tuple[int, str]] = []

    def close_block() -> None:
        if not block:
            return
        first = block[0][0]
        if len(block) == 1:
            raise DataError(path, f"question {block[0][1][:40]!r} has no answer line (a blank "
                                  "line or the end of the file follows it)", line=first)
        if len(block) > 2:
            raise DataError(path, f"block has {len(block)} lines; expected exactly a question "
                                  "line and an answer line (put each answer on one line, and a "
                                  f"blank line between blocks; line {block[2][0]} is extra)",
                            line=first)
        pairs.append({"q": block[0][1], "a": block[1][1]})
        block.clear()

    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if line:
            block.append((number, line))
        else:
            close_block()
    close_block()
    if not pairs:
        raise DataError(path, "no Q/A blocks found")
    return pairs


def read_qa_text(path: Path) -> list[QA]:
    """Read and parse a raw Q/A text file (see `parse_qa_text`)."""
    path = Path(path)
    return parse_qa_text(_decode(path, path.read_bytes()), path)


def ingest(source: Path) -> StageResult:
    """Raw Q/A text -> `qa.json` (`[{"q", "a"}]`) under outputs/ingest/<digest>/."""
    pairs = read_qa_text(source)
    with staging_dir(stage_root("ingest")) as tmp:
        atomic_write_json(tmp / "qa.json", pairs)
        out, digest = publish_dir(tmp, stage_root("ingest"))
    return StageResult(stage="ingest", path=str(out), digest=digest,
                       files={"qa_json": str(out / "qa.json")},
                       metrics={"qa_pairs": len(pairs)},
                       info={"source": str(source)})
