"""The bad-input corpus (tests/data/bad/): every malformed input is refused through the real
ingest -> conversations -> validate cores with an error naming the file, the line or record
(and the JSON path where there is one) and the problem in plain words, leaving no output
behind; the record-level ones are skipped and counted instead when on_error="skip"."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tasks.runtime.errors import DataError
from tasks.runtime.results import stage_root
from tasks.data.conversations import build_conversations
from tasks.data.ingest import ingest
from tasks.data.validate import validate_data

BAD = Path(__file__).parents[1] / "data" / "bad"

# file -> (words in the message, line, record, JSON path, kind when skippable, config)
CASES: dict[str, tuple[str, int | None, int | None, str | None, str | None, dict]] = {
    "odd_lines_block.txt": ("block has 3 lines; expected exactly a question line and an "
                            "answer line", 1, None, None, "extra-lines", {}),
    "crlf_extra_line.txt": ("block has 3 lines", 4, None, None, "extra-lines", {}),
    "answerless_last_block.txt": ("question '问题三没有答案？' has no answer line", 7, None, None,
                                  "no-answer", {}),
    "blank_between_q_and_a.txt": ("question '问题二？' has no answer line", 4, None, None,
                                  "no-answer", {}),
    "invalid_utf8.txt": ("is not valid UTF-8 (byte 0xe9", 5, None, None, None, {}),
    "empty.txt": ("the file is empty", None, None, None, None, {}),
    "whitespace_only.txt": ("the file is empty", None, None, None, None, {}),
    "nul_bytes.txt": ("contains a NUL byte", 4, None, None, None, {}),
    "utf16.txt": ("contains a NUL byte: this is a binary file, or UTF-16 text", 1, None,
                  None, None, {}),
    "binary.json": ("contains a NUL byte", 1, None, None, None, {}),
    "trailing_comma.json": ("invalid JSON: trailing comma is not allowed", 3, None, None,
                            None, {}),
    "truncated.json": ("invalid JSON: unexpected end of data", 4, None, None, None, {}),
    "not_json.json": ("is not JSON (it starts with neither '[' nor '{')", None, None, None,
                      None, {}),
    "empty_array.json": ("the JSON array is empty", None, None, None, None, {}),
    "pretty_object.json": ("the top level is one JSON object, not a list of records", 1, None,
                           None, None, {}),
    "wrong_type.json": ("is a number (42), expected a string", 3, 1, "$[1].a",
                        "wrong-type", {}),
    "null_answer.json": ("is null, expected a string", 1, 2, "$[2].a", "wrong-type", {}),
    "empty_question.json": ("is empty", 1, 0, "$[0].q", "empty-text", {}),
    "whitespace_answer.jsonl": ("is empty (or only white space)", 2, 1, "$.a", "empty-text",
                                {}),
    "missing_field.jsonl": ("is not a qa record", 3, 2, "$", "missing-field", {}),
    "unknown_format.json": ("match no known format", 1, 0, "$[0]", None, {}),
    "ambiguous_record.json": ("matches several formats (qa, adgen)", 1, 0, "$[0]", None,
                              {}),
    "mixed_formats.jsonl": ("this is an adgen record, but the data set's format is qa", 3, 2,
                            "$", None, {}),
    "mixed_formats_dir": ("this is an alpaca record, but the data set's format is qa (from "
                          "a.json record #0)", 1, 0, "$[0]", None, {}),
    "mixed_txt_json_dir": ("is JSON, but the data set's format is txt", None, None, None,
                           None, {}),
    "sharegpt_unknown_role.json": ("role 'bot' is unknown", 3, 1,
                                   "$[1].conversations[1].from", "unknown-role", {}),
    "conversation_unknown_role.json": ("role 'human' is unknown", 4, 2,
                                       "$[2].conversations[0].role", "unknown-role", {}),
    "ends_on_user.json": ("ends on a user turn", 2, 0, "$[0].conversations[2].content",
                          "ends-on-user", {}),
    "sharegpt_starts_with_gpt.jsonl": ("is an assistant turn where a user turn is expected", 2,
                                       1, "$.conversations[0].from", "turn-order", {}),
    "alpaca_bad_history.json": ("expected a [question, answer] pair", 3, 1,
                                "$[1].history[0]", "wrong-type", {}),
    "alpaca_input_not_text.json": ("is an array", 4, 2, "$[2].input", "wrong-type", {}),
    "conversations_not_a_list.json": ("is an object, expected an array", 3, 1,
                                      "$[1].conversations", "wrong-type", {}),
    "record_not_object.jsonl": ("is an array, expected an object", 3, 2, "$", "wrong-type",
                                {}),
    "broken_json_line.jsonl": ("line is not valid JSON", 2, 1, None, "invalid-json", {}),
    "too_long_answer.jsonl": ("is 58 characters long, more than max_chars=40", 2, 1, "$.a",
                              "too-long", {"max_chars": 40}),
    "duplicates.txt": ("this record is an exact duplicate of duplicates.txt:1", 7, None, None,
                       "duplicate", {"duplicates": "fail"}),
}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def run(source: Path, on_error: str = "fail", max_chars: int = 100_000,
        duplicates: str = "drop"):
    """The data stage cores, in pipeline order."""
    qa = ingest(source, "auto", on_error, max_chars)
    data = build_conversations(qa.out.records_arrow, duplicates=duplicates)
    return qa, data, validate_data(qa.out, data.out)


def published(stage: str) -> list[str]:
    root = stage_root(stage)
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_the_corpus_is_large_and_fully_covered():
    assert len(CASES) >= 25
    assert sorted(p.name for p in BAD.iterdir()) == sorted(CASES)
    assert all(p.stat().st_size < 4096 for p in BAD.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_with_a_precise_error_and_leaves_no_output(name):
    words, line, record, json_path, kind, config = CASES[name]
    with pytest.raises(DataError) as caught:
        run(BAD / name, "fail", **config)
    error = caught.value
    assert words in str(error), str(error)
    assert re.search(re.escape(name) + r"\b", str(error)), "the message names the file"
    assert (error.line, error.record, error.json_path) == (line, record, json_path)
    assert all(not n.startswith(".") for s in ("ingest", "conversations")
               for n in published(s)), "no staging directory left behind"
    if kind != "duplicate":
        assert published("ingest") == [] and published("conversations") == []


@pytest.mark.parametrize("name", sorted(n for n, case in CASES.items() if case[4]))
def test_record_level_problems_are_skipped_and_counted_when_configured(name):
    words, line, record, json_path, kind, config = CASES[name]
    if kind == "duplicate":                          # the default for duplicates: drop, count
        qa, data, _ = run(BAD / name)
        assert data.metrics["duplicates_dropped"] == 1
        assert data.info["duplicate_examples"][0] == {"record": "duplicates.txt:7",
                                                      "duplicate_of": "duplicates.txt:1"}
        return
    qa, data, checked = run(BAD / name, "skip", max_chars=config.get("max_chars", 100_000))
    assert qa.metrics["skipped_records"] >= 1 and qa.metrics[f"skipped.{kind}"] >= 1
    first = qa.info["skipped_examples"][0]
    assert words in first["message"] and (first["line"], first["record"],
                                          first["json_path"]) == (line, record, json_path)
    assert data.metrics["train_records"] + data.metrics["dev_records"] == qa.metrics["records"]
    assert checked.metrics["train_valid_records"] == data.metrics["train_records"]


def test_a_10_mb_single_line_is_refused_quickly_by_line(tmp_path):
    huge = tmp_path / "one_line.txt"
    huge.write_text("问" * 3_500_000, encoding="utf-8")        # 10.5 MB, no line break
    with pytest.raises(DataError) as caught:
        run(huge)
    assert "one_line.txt:1: line is 3,500,000 characters long, more than max_chars=100,000" \
        in str(caught.value)
    mixed = tmp_path / "long_answer.txt"
    mixed.write_text("问题一？\n答案一。\n\n问题二？\n" + "答" * 3_500_000 + "\n\n问题三？\n答案三。\n"
                     "\n问题四？\n答案四。\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"long_answer.txt:5: line is 3,500,000 characters"):
        run(mixed)
    qa, data, _ = run(mixed, "skip")
    assert qa.metrics["skipped.too-long"] == 1 and qa.metrics["records"] == 3


# file content, on_error -> (where, words of the reason, words of the hint). The conversations
# stage is given the user's file and the skipped count as the data flow gives them
# (flows/data.py); tests/ops/test_cli_errors.py prints the first case through the command line.
TOO_FEW = {
    "one.json": ('{"q": "问题？", "a": "答案。"}\n', "fail",
                 ("one.json:1: ", "the top level is one JSON object, not a list of records",
                  "a .json data set is a JSON array of records")),
    "one.jsonl": ('{"q": "问题？", "a": "答案。"}\n', "fail",
                  ("one.jsonl: ", "need at least 2 records", "at least 2 records")),
    "mostly_bad.jsonl": ('{"q": "问题？", "a": "答案。"}\n{"q": 1, "a": 2}\n'
                         '{"q": "", "a": "答案三"}\n', "skip",
                         ("mostly_bad.jsonl: ", "got 1",
                          "2 malformed record(s) were skipped (data.on_error=skip)")),
    "no_turns.json": ('[{"conversations": []}, {"conversations": []}]', "fail",
                      ("no_turns.json:1 record #0 at $[0].conversations: ", "has no turns",
                       "set data.on_error=skip")),
}


@pytest.mark.parametrize("name", sorted(TOO_FEW))
def test_too_few_records_name_the_file_and_say_what_to_do(name, tmp_path):
    text, on_error, (where, words, hint) = TOO_FEW[name]
    source = tmp_path / name
    source.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        qa = ingest(source, "auto", on_error)
        build_conversations(qa.out.records_arrow, source=source,
                            skipped=int(qa.metrics.get("skipped_records", 0)))
    error = caught.value
    assert str(error).startswith(str(tmp_path / where)), str(error)
    assert words in error.reason and hint in error.hint, (error.reason, error.hint)
    assert "several formats" not in str(error) + error.hint
    assert published("conversations") == []
