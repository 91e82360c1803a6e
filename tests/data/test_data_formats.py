"""Every input format, from real files in tests/data/formats/, through the real stage cores:
ingest (detect + convert) -> conversations (split) -> validate (schemas)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.runtime.errors import DataError
from tasks.data.conversations import build_conversations
from tasks.data.ingest import ingest
from tasks.data.validate import validate

FORMATS = Path(__file__).parents[1] / "data" / "formats"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))


def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


def run_stages(source: Path, fmt: str = "auto") -> tuple[dict, list[list[dict]]]:
    """ingest -> conversations -> validate; returns (ingest info, all conversations)."""
    qa = ingest(source, fmt)
    data = build_conversations(qa.out.records_arrow, duplicates="keep")
    files = {"train": (data.out.train_json, "conversation"),
             "dev": (data.out.dev_json, "conversation")}
    if "qa_json" in qa.files:
        files["qa"] = (qa.out.qa_json, "qa")
    checked = validate(files)
    assert checked.metrics["train_valid_records"] == data.metrics["train_records"]
    records = [r["conversations"] for s in ("train", "dev")
               for r in json.loads(getattr(data.out, f"{s}_json").read_text(encoding="utf-8"))]
    return {**qa.info, "files_out": qa.files, "metrics": qa.metrics}, records


@pytest.mark.parametrize("name, fmt, last", [
    ("qa_blocks_crlf_bom.txt", "txt", turns(("user", "吊兰要晒太阳吗？"),
                                            ("assistant", "喜半阴，避免暴晒。"))),
    ("qa.json", "qa", turns(("user", "How often to water a cactus?"), (
        "assistant", "Every two to three weeks in summer,\nalmost never in winter."))),
    ("qa.jsonl", "qa", turns(("user", "吊兰要晒太阳吗？"), ("assistant", "喜半阴，避免暴晒。"))),
    ("adgen.json", "adgen", turns(("user", "类型#裙*颜色#红色*风格#复古"),
                                  ("assistant", "复古的红色连衣裙，优雅又显气质。"))),
    ("adgen_array.json", "adgen", turns(("user", "类型#裙*风格#复古"),
                                        ("assistant", "复古优雅的连衣裙。"))),
    ("instruction_output.jsonl", "alpaca", turns(("user", "类型#裙*颜色#红色"),
                                                 ("assistant", "复古的红色连衣裙。"))),
    ("instruct_query_answer.txt", "instruct", turns(
        ("user", "你现在是一个实体识别模型，你需要提取文本里面的人名、地名、机构名。\n"
                 "文本：张三在北京大学读书。"), ("assistant", "张三_人名\n北京大学_机构名"))),
    ("alpaca.json", "alpaca", turns(
        ("system", "你是园艺助手。"), ("user", "绿萝要晒太阳吗？"), ("assistant", "喜散射光，不要暴晒。"),
        ("user", "放在哪里好？"), ("assistant", "放在朝东的窗边。"), ("user", "那冬天呢？"),
        ("assistant", "冬天减少到两周一次。"))),
    ("sharegpt.json", "sharegpt", turns(("system", "你是花卉专家。"), ("user", "月季怎么修剪？"),
                                        ("assistant", "花后剪掉残花和弱枝。"))),
    ("conversation.json", "conversation", turns(("user", "吊兰要晒太阳吗？"),
                                                ("assistant", "喜半阴，避免暴晒。"))),
])
def test_each_format_is_detected_converted_split_and_validated(name, fmt, last):
    info, records = run_stages(FORMATS / name)
    assert info["format"] == fmt
    assert len(records) == 3 and records[-1] == last
    # the same file with the format given explicitly gives the same records
    assert run_stages(FORMATS / name, fmt)[1] == records


def test_alpaca_input_is_appended_to_the_instruction():
    _, records = run_stages(FORMATS / "alpaca.json")
    assert records[0] == turns(("user", "把下面的句子翻译成英文。\n今天天气很好。"),
                               ("assistant", "The weather is nice today."))
    assert records[1][0] == {"role": "user", "content": "给绿萝浇水的频率是多少？"}   # empty input


def test_sharegpt_multi_turn_with_system_role():
    _, records = run_stages(FORMATS / "sharegpt.json")
    assert [t["role"] for t in records[1]] == ["system", "user", "assistant", "user",
                                               "assistant"]


def test_qa_json_artifact_only_for_pair_data():
    info, _ = run_stages(FORMATS / "qa_blocks_crlf_bom.txt")
    assert "qa_json" in info["files_out"] and info["metrics"]["qa_pairs"] == 3
    info, _ = run_stages(FORMATS / "sharegpt.json")                 # multi-turn: no QA view
    assert "qa_json" not in info["files_out"]


def test_ignored_fields_are_reported():
    info, _ = run_stages(FORMATS / "qa.jsonl")                      # one record has an "id"
    assert info["ignored_fields"] == {"id": 1}


def test_directory_of_one_format_is_one_data_set_in_natural_order():
    info, records = run_stages(FORMATS / "jsonl_dir")
    assert info["format"] == "qa"
    assert info["file_names"] == ["part-1.jsonl", "part-2.jsonl", "part-10.jsonl"]
    assert info["ignored_files"][0].endswith("README.md")
    assert [r[0]["content"] for r in records] == [
        "绿萝叶子发黄怎么办？", "多肉多久浇一次水？", "月季怎么修剪？", "文竹怎么养？", "茉莉怎么施肥？"]


def test_configured_format_must_match_the_records():
    with pytest.raises(DataError, match=r"qa.json:2 record #0 at \$\[0\]: this is a qa record, "
                                        r"but the data set's format is sharegpt \(from the "
                                        r"config's `format`\)"):
        ingest(FORMATS / "qa.json", "sharegpt")
    with pytest.raises(DataError, match=r"crlf_bom.txt: is not JSON \(it starts with neither "
                                        r"'\[' nor '\{'\), but format=qa says it is"):
        ingest(FORMATS / "qa_blocks_crlf_bom.txt", "qa")


def test_json_lines_in_a_txt_file_or_raw_text_by_configuration(tmp_path):
    # some tutorials keep JSON Lines in .txt; format=txt reads the same file as raw text
    info, _ = run_stages(FORMATS / "instruct_query_answer.txt")
    assert info["format"] == "instruct"
    src = tmp_path / "braces.txt"
    src.write_text('{"q": 1}\n答案\n\n问题\n答案\n', encoding="utf-8")
    info, records = run_stages(src, "txt")
    assert records[0] == turns(("user", '{"q": 1}'), ("assistant", "答案"))
    info, _ = run_stages(src)            # auto: the first line is JSON but the rest is not
    assert info["format"] == "txt"
