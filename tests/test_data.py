"""Data stage cores: the txt parser, the exact split, schema validation, atomic outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.common import DataError, REPO_DIR, stage_root
from tasks.conversations import build_conversations, split_train_dev
from tasks.ingest import ingest, parse_qa_text, read_qa_text
from tasks.validate import validate_file

SAMPLE = REPO_DIR / "data" / "sample" / "plant_care_qa.txt"


def test_parser_tolerates_bom_crlf_trailing_spaces_and_blank_runs():
    text = "\ufeff问题一？  \r\n答案一。\t\r\n\r\n\r\n   \r\n问题二？\r\n答案二。\r\n"
    assert parse_qa_text(text) == [{"q": "问题一？", "a": "答案一。"},
                                   {"q": "问题二？", "a": "答案二。"}]


def test_parser_handles_missing_final_newline_and_bare_cr():
    assert parse_qa_text("Q1\rA1\r\rQ2\nA2") == [{"q": "Q1", "a": "A1"}, {"q": "Q2", "a": "A2"}]


@pytest.mark.parametrize("text, line, words", [
    ("Q1\nA1\nA1b\n\nQ2\nA2\n", 1, "block has 3 lines"),
    ("Q1\nA1\n\nQ2\nA2\n\nQ3\n", 7, "has no answer line"),
    ("Q1\nA1\n\nQ2\n\nA2\n", 4, "has no answer line"),
    ("\n \n\t\n", None, "empty"),
])
def test_parser_refuses_what_it_cannot_pair(tmp_path, text, line, words):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_qa_text(path)
    assert e.value.line == line and words in str(e.value) and str(path) in str(e.value)


def test_invalid_utf8_and_nul_bytes_are_located(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Q1\nA1\n\nQ2\n".encode() + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:5: is not valid UTF-8"):
        read_qa_text(bad)
    nul = tmp_path / "utf16.txt"
    nul.write_bytes("Q1\nA1\n".encode("utf-16-le"))
    with pytest.raises(DataError, match="NUL byte"):
        read_qa_text(nul)


def test_sample_corpus_is_large_clean_and_one_domain():
    pairs = read_qa_text(SAMPLE)
    assert len(pairs) >= 300
    assert len({p["q"] for p in pairs}) == len(pairs)
    assert all(p["q"].endswith("？") and 10 <= len(p["a"]) <= 200 for p in pairs)


@pytest.mark.parametrize("n, train", [(2, 1), (3, 2), (10, 7), (342, 239), (1000, 700)])
def test_split_is_exact_70_30(n, train):
    tr, dev = split_train_dev(range(n), 0.7)
    assert (len(tr), len(dev)) == (train, n - train)
    assert tr + dev == list(range(n))          # order kept, nothing lost or duplicated


def test_seeded_shuffle_is_deterministic():
    a = split_train_dev(range(100), 0.7, shuffle_seed=1)
    assert a == split_train_dev(range(100), 0.7, shuffle_seed=1)
    assert a != split_train_dev(range(100), 0.7, shuffle_seed=2)
    assert sorted(a[0] + a[1]) == list(range(100))


def test_ingest_and_conversations_write_valid_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path))
    qa = ingest(SAMPLE)
    assert validate_file(qa.file("qa_json"), "qa") == qa.metrics["qa_pairs"]
    conv = build_conversations(qa.file("qa_json"), system_prompt="你是园艺助手。")
    train = json.loads(conv.file("train_json").read_text(encoding="utf-8"))
    assert train[0]["conversations"][0] == {"role": "system", "content": "你是园艺助手。"}
    assert [t["role"] for t in train[0]["conversations"]] == ["system", "user", "assistant"]
    assert validate_file(conv.file("dev_json"), "conversation") == conv.metrics["dev_records"]
    again = ingest(SAMPLE)                          # same content -> same content address
    assert (again.path, again.digest) == (qa.path, qa.digest)


def test_failed_ingest_leaves_no_partial_output(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path))
    bad = tmp_path / "bad.txt"
    bad.write_text("Q1\nA1\n\nQ2\n", encoding="utf-8")
    with pytest.raises(DataError):
        ingest(bad)
    root = stage_root("ingest")
    assert not root.exists() or list(root.iterdir()) == []


@pytest.mark.parametrize("records, kind, record, json_path, words", [
    ([{"q": "Q", "a": "A"}, {"q": "", "a": "A"}], "qa", 1, "$[1].q", "should be non-empty"),
    ([{"q": "Q", "a": 3}], "qa", 0, "$[0].a", "is not of type 'string'"),
    ([{"conversations": [{"role": "user", "content": "Q"},
                         {"role": "bot", "content": "A"}]}], "conversation", 0,
     "$[0].conversations[1].role", "is not one of"),
    ([{"conversations": [{"role": "assistant", "content": "A"},
                         {"role": "user", "content": "Q"}]}], "conversation", 0,
     "$[0].conversations[0].role", "expected 'user'"),
    ([{"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                         {"role": "user", "content": "Q2"}]}], "conversation", 0,
     "$[0].conversations", "does not end on an assistant turn"),
])
def test_validation_names_record_and_json_path(tmp_path, records, kind, record, json_path, words):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError) as e:
        validate_file(path, kind)
    assert (e.value.record, e.value.json_path) == (record, json_path)
    assert words in str(e.value) and str(path) in str(e.value)


def test_validation_reports_json_syntax_errors_with_line(tmp_path):
    path = tmp_path / "trailing_comma.json"
    path.write_text('[\n {"q": "Q", "a": "A"},\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"trailing_comma.json:3: invalid JSON"):
        validate_file(path, "qa")
