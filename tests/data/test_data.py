"""Data stage cores: the txt parser, the exact and grouped split, dedup, schema validation (fast
path == jsonschema), JSON/Parquet writing, atomic outputs and the data report."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from jsonschema import Draft202012Validator

from tasks.runtime.errors import DataError
from tasks.runtime.paths import REPO_DIR
from tasks.runtime.results import stage_root
from tasks.data.conversations import build_conversations, split_indices, split_train_dev
from tasks.data.data_report import build_data_report
from tasks.data.dataset_io import CONVERSATIONS, QA, read_json_records, write_json_records
from tasks.data.ingest import ingest
from tasks.data.qa_text import parse_qa_text, read_qa_text
from tasks.data.validate import check_file, load_schema, validate_file

SAMPLE = REPO_DIR / "data" / "sample" / "plant_care_qa.txt"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def conv(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"role": r, "content": c} for r, c in turns]}


# ---------------------------------------------------------------------------------------------
# raw txt
# ---------------------------------------------------------------------------------------------
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
    ("Q1\r\nA1\r\n\r\nQ2\r\nA2\r\nA2b\r\n", 4, "block has 3 lines"),
    ("\n \n\t\n", None, "empty"),
])
def test_parser_refuses_what_it_cannot_pair(tmp_path, text, line, words):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8", newline="")
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


# ---------------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------------
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
    assert len(a[0]) == 70


@pytest.mark.parametrize("seed", [None, 0, 5])
def test_group_split_never_puts_one_question_on_both_sides(seed):
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 40, size=300)              # 300 records, ~40 questions
    train, dev = split_indices(300, 0.7, seed, groups)
    assert sorted(np.concatenate([train, dev]).tolist()) == list(range(300))
    assert not set(groups[train]) & set(groups[dev])
    sizes = np.bincount(groups)
    assert abs(len(train) - 210) <= sizes.max()         # as close as whole groups allow
    again = split_indices(300, 0.7, seed, groups)
    assert np.array_equal(train, again[0]) and np.array_equal(dev, again[1])


def test_group_split_needs_two_questions():
    with pytest.raises(ValueError, match="same question"):
        split_indices(5, 0.7, None, np.zeros(5, int))


# ---------------------------------------------------------------------------------------------
# stages: ingest -> conversations -> validate -> report
# ---------------------------------------------------------------------------------------------
def test_ingest_and_conversations_write_valid_files():
    qa = ingest(SAMPLE)
    assert validate_file(qa.out.qa_json, "qa") == qa.metrics["qa_pairs"] == 342
    assert json.loads(qa.out.qa_json.read_text(encoding="utf-8")) == read_qa_text(SAMPLE)
    conv_ = build_conversations(qa.out.records_arrow, system_prompt="你是园艺助手。")
    train = json.loads(conv_.out.train_json.read_text(encoding="utf-8"))
    assert train[0]["conversations"][0] == {"role": "system", "content": "你是园艺助手。"}
    assert [t["role"] for t in train[0]["conversations"]] == ["system", "user", "assistant"]
    assert validate_file(conv_.out.dev_json, "conversation") == conv_.metrics["dev_records"]
    assert (conv_.metrics["train_records"], conv_.metrics["dev_records"]) == (239, 103)
    assert pa.parquet.read_table(conv_.out.train_parquet).to_pylist() == train
    again = ingest(SAMPLE)                          # same content -> same content address
    assert (again.path, again.digest) == (qa.path, qa.digest)


def test_parquet_copies_load_with_datasets():
    import datasets

    qa = ingest(SAMPLE)
    out = build_conversations(qa.out.records_arrow)
    ds = datasets.load_dataset("parquet", data_files={"train": str(out.out.train_parquet)},
                               split="train")
    assert len(ds) == 239 and ds[0]["conversations"][0]["role"] == "user"


def test_duplicates_dropped_kept_or_refused(tmp_path):
    src = tmp_path / "dup.txt"
    src.write_text("Q1\nA1\n\nQ2\nA2\n\nQ1\nA1\n\nQ1\nA1 other\n\nQ3\nA3\n", encoding="utf-8")
    records = ingest(src).out.records_arrow
    dropped = build_conversations(records)
    assert dropped.metrics["duplicates_dropped"] == 1
    assert dropped.metrics["train_records"] + dropped.metrics["dev_records"] == 4
    example = json.loads(dropped.out.duplicates_json.read_text())["examples"][0]
    assert example == {"record": "dup.txt:7", "duplicate_of": "dup.txt:1"}
    kept = build_conversations(records, duplicates="keep")
    assert kept.metrics["train_records"] + kept.metrics["dev_records"] == 5
    with pytest.raises(DataError, match=r"dup.txt:7: this record is an exact duplicate of "
                                        r"dup.txt:1 \(duplicates=fail\)"):
        build_conversations(records, duplicates="fail")


def test_same_text_cut_differently_is_not_a_duplicate(tmp_path):
    src = tmp_path / "c.jsonl"
    rows = [conv(("user", "ab"), ("assistant", "c")), conv(("user", "a"), ("assistant", "bc")),
            conv(("user", "ab"), ("assistant", "c")), conv(("user", "x"), ("assistant", "y"))]
    src.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    out = build_conversations(ingest(src).out.records_arrow)
    assert out.metrics["duplicates_dropped"] == 1


def test_split_by_question_keeps_repeated_questions_together(tmp_path):
    src = tmp_path / "q.txt"
    blocks = [f"Q{i % 7}\nanswer {i}\n" for i in range(30)]   # 7 questions, repeated
    src.write_text("\n".join(blocks), encoding="utf-8")
    out = build_conversations(ingest(src).out.records_arrow, split_by="question",
                              shuffle_seed=1)
    questions = {s: {r["conversations"][0]["content"] for r in json.loads(
        getattr(out.out, f"{s}_json").read_text())} for s in ("train", "dev")}
    assert questions["train"] and questions["dev"]
    assert not questions["train"] & questions["dev"]
    assert out.metrics["question_groups"] == 7


def test_failed_ingest_leaves_no_partial_output(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("Q1\nA1\n\nQ2\n", encoding="utf-8")
    with pytest.raises(DataError):
        ingest(bad)
    root = stage_root("ingest")
    assert not root.exists() or list(root.iterdir()) == []


def test_data_report_counts_histograms_and_sample(tmp_path):
    src = tmp_path / "r.txt"
    src.write_text(SAMPLE.read_text(encoding="utf-8") + "\n孤零零的问题？\n", encoding="utf-8")
    qa = ingest(src, on_error="skip")
    data = build_conversations(qa.out.records_arrow)
    report = build_data_report(qa.out, data.out)
    body = json.loads(report.out.data_report_json.read_text(encoding="utf-8"))
    assert body["counts"] == {"files": 1, "read": 343, "skipped": 1, "duplicates_dropped": 0,
                              "train": 239, "dev": 103}
    assert body["skipped"] == {"no-answer": 1}
    assert "jieba words" in body["token_unit"]
    assert body["tokens"]["train"]["assistant"]["n"] == 239
    assert body["turns"]["train"] == {"2": 239}
    for png in ("chars_hist_png", "tokens_hist_png", "turns_hist_png"):
        assert getattr(report.out, png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = report.out.data_report_md.read_text(encoding="utf-8")
    assert "孤零零的问题" in md and "no-answer" in md and "![" in md


# ---------------------------------------------------------------------------------------------
# validation: the fast path accepts exactly what jsonschema accepts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("records, kind, record, json_path, words", [
    ([{"q": "Q", "a": "A"}, {"q": "", "a": "A"}], "qa", 1, "$[1].q", "should be non-empty"),
    ([{"q": "Q", "a": 3}], "qa", 0, "$[0].a", "is not of type 'string'"),
    ([{"q": "Q", "a": "\u3000 "}], "qa", 0, "$[0].a", "does not match"),
    ([conv(("user", "Q"), ("bot", "A"))], "conversation", 0,
     "$[0].conversations[1].role", "is not one of"),
    ([conv(("assistant", "A"), ("user", "Q"))], "conversation", 0,
     "$[0].conversations[0].role", "expected 'user'"),
    ([conv(("user", "Q"), ("assistant", "A"), ("user", "Q2"))], "conversation", 0,
     "$[0].conversations", "does not end on an assistant turn"),
    ([conv(("user", "Q"), ("assistant", "A")), {"conversations": [
        {"role": "user", "content": "Q", "x": 1}, {"role": "assistant", "content": "A"}]}],
     "conversation", 1, "$[1].conversations[0]", "Additional properties"),
])
@pytest.mark.parametrize("layout", ["ours", "pretty"])
def test_validation_names_record_and_json_path(tmp_path, records, kind, record, json_path,
                                                words, layout):
    path = tmp_path / "x.json"
    text = json.dumps(records, ensure_ascii=False, indent=2) if layout == "pretty" else \
        "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as e:
        validate_file(path, kind)
    assert (e.value.record, e.value.json_path) == (record, json_path)
    assert words in str(e.value) and str(path) in str(e.value)


def test_validation_reports_json_syntax_errors_with_line(tmp_path):
    path = tmp_path / "trailing_comma.json"
    path.write_text('[\n {"q": "Q", "a": "A"},\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"trailing_comma.json:2: invalid JSON: trailing comma"):
        validate_file(path, "qa")


def _random_record(rng: random.Random) -> dict:
    """A valid conversation, half the time with one random defect."""
    good = ["Q", "答", "a\nb", 'q"x', "ok\x00", "\u00a0x", "emoji 🌱"]
    turns = ([{"role": "system", "content": "S"}] if rng.random() < 0.3 else []) + [
        {"role": role, "content": rng.choice(good)}
        for _ in range(rng.randint(1, 3)) for role in ("user", "assistant")]
    if rng.random() < 0.5:
        turn = rng.choice(turns)
        defect = rng.randrange(6)
        if defect == 0:      # Python-whitespace-only texts, incl. ones RE2's \s does not know
            turn["content"] = rng.choice(["", " ", "\u3000", "\x1c", "\x85", "\u2028 "])
        elif defect == 1:
            turn["content"] = rng.choice([5, None, ["x"]])
        elif defect == 2:
            turn["role"] = rng.choice(["bot", "system", "user", "assistant", None])
        elif defect == 3:
            turns.pop()
        elif defect == 4:
            turn[rng.choice(["extra", "name"])] = "x"
        else:
            del turn[rng.choice(["role", "content"])]
    return {"conversations": turns}


def test_fast_path_accepts_exactly_what_jsonschema_and_turn_order_accept(tmp_path):
    rng = random.Random(0)
    schema = load_schema("conversation")
    items = Draft202012Validator(schema["items"])
    seen = {"fast": 0, "exact": 0, "refused": 0}
    for case in range(300):
        record = _random_record(rng)
        path = tmp_path / f"{case}.json"
        path.write_text("[\n" + json.dumps(record, ensure_ascii=False) + "\n]\n",
                        encoding="utf-8")
        roles = [t.get("role") for t in record["conversations"]]
        body = roles[1:] if roles and roles[0] == "system" else roles
        expected = items.is_valid(record) and bool(body) and body[-1] == "assistant" and all(
            r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(body))
        try:
            n, how = check_file(path, "conversation")
            assert expected and n == 1
            seen[how] += 1
        except DataError:
            assert not expected
            seen["refused"] += 1
    assert seen["fast"] > 50 and seen["refused"] > 50 and seen["exact"] == 0


def test_json_writer_round_trips_through_the_standard_library(tmp_path):
    texts = ["plain", 'quote " inside', "back\\slash", "tab\tnew\nline", "\x00\x1f ctl",
             "中文 \u2028 sep", "emoji 🌱", " "]
    rows = [{"q": a, "a": b} for a in texts for b in texts]
    table = pa.Table.from_pylist(rows, schema=QA)
    for part in (table, table.slice(7, 20)):
        path = tmp_path / "qa.json"
        write_json_records(path, part)
        assert json.loads(path.read_text(encoding="utf-8")) == part.to_pylist()
        back = read_json_records(path, pa.schema([("q", pa.large_string()),
                                                  ("a", pa.large_string())]))
        assert back is not None and back.to_pylist() == part.to_pylist()
    many = pa.Table.from_pylist([conv(("user", "q"), ("assistant", f"a{i}")) for i in
                                 range(3000)], schema=CONVERSATIONS)
    write_json_records(tmp_path / "many.json", many)
    assert json.loads((tmp_path / "many.json").read_text()) == many.to_pylist()
    assert check_file(tmp_path / "many.json", "conversation") == (3000, "fast")


def test_data_report_counts_tokens_with_a_configured_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tasks.model.tokenizer import data_tokenizer

    texts = [p[k] for p in read_qa_text(SAMPLE) for k in ("q", "a")]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400,
                                                       special_tokens=["[UNK]"]))
    folder = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    qa = ingest(SAMPLE)
    data = build_conversations(qa.out.records_arrow)
    report = build_data_report(qa.out, data.out, data_tokenizer(folder), str(folder))
    body = json.loads(report.out.data_report_json.read_text(encoding="utf-8"))
    assert body["token_unit"].startswith("tokens of ") and str(folder) in body["token_unit"]
    train = json.loads(data.out.train_json.read_text(encoding="utf-8"))
    counts = [len(tok.encode(r["conversations"][1]["content"]).ids) for r in train]
    stats = body["tokens"]["train"]["assistant"]
    assert (stats["n"], stats["max"], stats["mean"]) == (
        len(counts), max(counts), round(sum(counts) / len(counts), 1))
