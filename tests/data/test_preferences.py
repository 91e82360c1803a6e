"""The preference pairs (tasks/data/preferences.py, README "Preference tuning"): three formats
read into one, each malformed record refused naming file, line, record and field -- or
skipped and counted -- duplicates dropped, an exact split, the schema held, nothing left behind
by a refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.data.preferences import FOLLOW_UP, SAMPLE, build_preferences, read_pairs
from tasks.runtime.errors import DataError
from tasks.runtime.files import read_json

Q = [{"role": "user", "content": "绿萝叶子发黄怎么办？"}]


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def trl(i: int, **change) -> dict:
    return {"prompt": f"问题{i}？", "chosen": f"好的回答{i}。", "rejected": f"差的回答{i}。",
            **change}


def test_three_formats_become_one(tmp_path):
    jsonl(tmp_path / "a_trl.jsonl", [
        trl(1),
        {"prompt": Q, "chosen": [{"role": "assistant", "content": "检查盆土。"}],
         "rejected": [{"role": "assistant", "content": "不知道。"}]}])
    (tmp_path / "b_alpaca.json").write_text(json.dumps([
        {"instruction": "怎么浇水？", "input": "多肉", "chosen": "见干见湿。", "rejected": "每天浇。",
         "system": "你是园艺助手。", "history": [["你好", "你好！"]]}], ensure_ascii=False),
        encoding="utf-8")
    jsonl(tmp_path / "c_sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": "月季生虫了？"}],
         "chosen": {"from": "gpt", "value": "喷药。"}, "rejected": {"from": "gpt", "value": "扔掉。"}}])
    pairs, issues = read_pairs(tmp_path)
    assert issues.skipped == 0
    assert pairs == [
        {"prompt": [{"role": "user", "content": "问题1？"}], "chosen": "好的回答1。",
         "rejected": "差的回答1。"},
        {"prompt": Q, "chosen": "检查盆土。", "rejected": "不知道。"},
        {"prompt": [{"role": "system", "content": "你是园艺助手。"},
                    {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                    {"role": "user", "content": "怎么浇水？\n多肉"}],
         "chosen": "见干见湿。", "rejected": "每天浇。"},
        {"prompt": [{"role": "user", "content": "月季生虫了？"}], "chosen": "喷药。",
         "rejected": "扔掉。"}]


def good(i: int, like: dict) -> dict:
    """A sound pair in the format of record `like`."""
    if "instruction" in like:
        return {"instruction": f"问题{i}？", "chosen": f"好{i}", "rejected": f"差{i}"}
    if "conversations" in like:
        return {"conversations": [{"from": "human", "value": f"问题{i}？"}],
                "chosen": {"from": "gpt", "value": f"好{i}"},
                "rejected": {"from": "gpt", "value": f"差{i}"}}
    return trl(i)


@pytest.mark.parametrize("record, where, reason", [
    (trl(2, rejected="好的回答2。"), "at $.rejected", "chosen and rejected are the same answer"),
    (trl(2, chosen="  "), "at $.chosen", "is empty"),
    (trl(2, chosen=3), "at $.chosen", "is a number, expected a text"),
    ({"prompt": Q + [{"role": "assistant", "content": "嗯"}], "chosen": "a", "rejected": "b"},
     "at $.prompt", "the prompt ends on a assistant turn"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},
     "at $.prompt[0]", "role 'robot' is unknown"),
    ({"prompt": Q, "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "at $.chosen[0]", "is a 'user' message, expected the assistant's answer"),
    ({"question": "x", "answer": "y"}, "", "lacks chosen, prompt, rejected (format trl)"),
    # the other formats' prompts: read by the supervised formats' parsers (formats.py)
    ({"instruction": "怎么浇水？", "history": [["你好"]], "chosen": "a", "rejected": "b"},
     "at $.history[0]", "expected a [question, answer] pair"),
    ({"instruction": " ", "chosen": "a", "rejected": "b"}, "at $.instruction", "is empty"),
    ({"conversations": [{"from": "robot", "value": "x"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, "at $.conversations[0].from",
     "role 'robot' is unknown"),
])
def test_a_bad_record_is_refused_naming_file_line_record_and_field(tmp_path, record, where,
                                                                   reason):
    src = jsonl(tmp_path / "pairs.jsonl", [good(1, record), record, good(3, record)])
    with pytest.raises(DataError) as caught:
        read_pairs(src)                                      # the format: from record #0
    message = str(caught.value)
    assert message.startswith(f"{src}:2 record #1")
    assert where in message and reason in message
    assert "preference.on_error=skip" in caught.value.hint


def test_skip_counts_and_lists_what_it_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    src = jsonl(tmp_path / "pairs.jsonl",
                [trl(i) for i in range(10)] + [trl(10, chosen=""), trl(0)])   # bad + duplicate
    result = build_preferences(src, on_error="skip", train_ratio=0.7)
    report = read_json(Path(result.out.preference_report_json))
    assert report["counts"] == {"read": 11, "skipped": 1, "duplicates": 1, "train": 7, "dev": 3}
    assert "record #10" in report["skipped_examples"][0]["message"]
    assert report["skipped_by_kind"] == {"empty": 1}      # the records' kinds (BadRecord)
    train, dev = (read_json(getattr(result.out, f"{n}_pairs_json")) for n in ("train", "dev"))
    assert len(train) == 7 and len(dev) == 3
    assert {p["chosen"] for p in train} | {p["chosen"] for p in dev} == \
        {f"好的回答{i}。" for i in range(10)}                    # an exact, disjoint split


def test_a_refusal_leaves_no_output_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    src = jsonl(tmp_path / "pairs.jsonl", [trl(1), trl(2, chosen=None)])
    with pytest.raises(DataError, match=r"pairs.jsonl:2 record #1 at \$.chosen"):
        build_preferences(src)
    out = tmp_path / "home" / "outputs" / "preference_data"
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]


def test_a_bad_pair_in_a_json_array_is_named_by_line_and_path_as_a_data_record_is(tmp_path):
    # the same line as tasks/data/formats.py gives a bad conversation record: the line the array
    # element starts on, and its JSON path from `$[record]`
    src = tmp_path / "pairs.json"
    src.write_text(json.dumps([trl(0), trl(1, chosen=3)], ensure_ascii=False, indent=1),
                   encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_pairs(src)
    assert str(caught.value).startswith(
        f"{src}:7 record #1 at $[1].chosen: is a number, expected a text")
    assert (caught.value.line, caught.value.record, caught.value.json_path) == (7, 1, "$[1].chosen")


def test_a_file_without_pairs_is_refused(tmp_path):
    src = jsonl(tmp_path / "pairs.jsonl", [{"question": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r"pairs.jsonl:1 record #0 at \$: has the fields \['answer', "
                                        r"'question'\], which match no preference format"):
        read_pairs(src)
    with pytest.raises(DataError, match=r"pairs.jsonl: holds no preference pair \(1 skipped\)"):
        read_pairs(src, on_error="skip")


def test_the_sample_pairs_teach_what_the_supervised_data_does_not_have():
    pairs, _ = read_pairs(SAMPLE)
    assert len(pairs) >= 300
    assert all(p["chosen"] == p["rejected"] + FOLLOW_UP for p in pairs)
