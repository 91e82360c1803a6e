"""Generations and report stages on a tiny offline chat model: two differently-initialised
copies act as base and tuned; real files, real generation, real scoring, and the report rendered
from the generations file alone."""

from __future__ import annotations

import html
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parents[1]))

from _tiny_report_model import make_tiny_chat_model  # noqa: E402

from tasks.runtime.errors import DataError
from tasks.runtime.files import read_json  # noqa: E402
from tasks.config import ReportConfig  # noqa: E402
from tasks.model.model_spec import ModelSpec  # noqa: E402
from tasks.evaluate.generations import generate_answers  # noqa: E402
from tasks.evaluate.scoring import (  # noqa: E402
    average, read_dev_prompts, read_probes, score_answer)
from tasks.evaluate.report import render_report  # noqa: E402

SCRIPT = "<script>alert('x')</script>"
DEV = [
    {"conversations": [{"role": "user", "content": f"绿萝叶子发黄怎么办？{SCRIPT}"},
                       {"role": "assistant", "content": "绿萝喜欢散射光，避免暴晒。"}]},
    {"conversations": [{"role": "system", "content": "你是一个植物养护助手。"},
                       {"role": "user", "content": "多肉植物多久浇一次水？"},
                       {"role": "assistant", "content": "春秋两周左右浇一次。"},
                       {"role": "user", "content": "夏季呢？"},
                       {"role": "assistant", "content": "夏季和冬季要少浇。"}]},
    {"conversations": [{"role": "user", "content": "法国的首都是哪座城市？"},
                       {"role": "assistant", "content": "法国的首都是巴黎。"}]},
    {"conversations": [{"role": "user", "content": "十七加二十五等于多少？"},
                       {"role": "assistant", "content": "等于四十二。"}]},
    {"conversations": [{"role": "user", "content": "你好"},
                       {"role": "assistant", "content": "你好，我是一个植物养护助手。"}]},
]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_inputs")
    dev = root / "dev.json"
    dev.write_text(json.dumps(DEV, ensure_ascii=False), encoding="utf-8")
    probes = root / "probes.txt"
    probes.write_text("法国的首都是哪座城市？\n\n  \n十七加二十五等于多少？ <b>粗体</b>\n", encoding="utf-8")
    return {"base": make_tiny_chat_model(root / "base", seed=0),
            "tuned": make_tiny_chat_model(root / "tuned", seed=1), "dev": dev, "probes": probes}


def _cfg(probes: Path) -> ReportConfig:
    return ReportConfig(dev_examples=3, eval_examples=4, probes_file=probes, max_new_tokens=10)


def test_score_answer_known_strings():
    same = score_answer("绿萝喜欢散射光，避免暴晒，土壤见干见湿再浇水。",
                        "绿萝喜欢散射光，避免暴晒，土壤见干见湿再浇水。")
    assert same["rouge_1"] == pytest.approx(100) and same["rouge_l"] == pytest.approx(100)
    assert same["rouge_2"] == pytest.approx(100) and same["bleu_4"] == pytest.approx(100)
    disjoint = score_answer("法国巴黎", "多肉植物浇水")
    assert all(v == 0 for v in disjoint.values()), disjoint
    partial = score_answer("绿萝喜欢散射光", "绿萝喜欢散射光，避免暴晒")
    assert all(0 < v < 100 for v in partial.values()), partial
    assert all(v == 0 for v in score_answer("", "绿萝喜欢散射光").values())
    assert all(v == 0 for v in score_answer("  \n", "绿萝喜欢散射光").values())
    assert average([]) == dict.fromkeys(same, 0.0)
    assert average([same, disjoint]) == pytest.approx(dict.fromkeys(same, 50.0))


def test_inputs_are_read_and_bad_ones_refused(inputs, tmp_path):
    prompts = read_dev_prompts(inputs["dev"])
    msgs, ref = prompts[1]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert ref == "夏季和冬季要少浇。"
    assert read_probes(inputs["probes"]) == ["法国的首都是哪座城市？", "十七加二十五等于多少？ <b>粗体</b>"]

    empty = tmp_path / "empty_probes.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty_probes.txt"):
        read_probes(empty)
    bad = tmp_path / "bad_dev.json"
    bad.write_text(json.dumps([{"conversations": [{"role": "user", "content": "x"}]}]),
                   encoding="utf-8")
    with pytest.raises(DataError, match=r"bad_dev.json record #0.*assistant"):
        read_dev_prompts(bad)


def test_report_builds(inputs, home):
    cfg = _cfg(inputs["probes"])
    extra = {"Benchmark": "| model | tok/s |\n|---|---:|\n| base | 1.0 |"}
    res = generate_answers(ModelSpec(inputs["base"]), ModelSpec(inputs["tuned"]), inputs["dev"],
                           inputs["probes"], cfg)
    assert res.stage == "generations" and res.problem() is None
    assert Path(res.path).parent == home / "outputs" / "generations"
    report = render_report(res.out.generations_json, extra, title="Tiny report")
    assert report.stage == "report" and report.problem() is None
    assert Path(report.path).parent == home / "outputs" / "report"
    md = Path(report.files["report_md"]).read_text(encoding="utf-8")
    page = Path(report.files["report_html"]).read_text(encoding="utf-8")
    gens = read_json(res.files["generations_json"])
    assert report.summary == md and md.startswith("# Tiny report")
    assert md.rstrip().endswith(extra["Benchmark"])

    # every shown dev example and every probe: before and after text in the markdown
    assert len(gens["dev"]) == 4 and len(gens["probes"]) == 2
    for ex in gens["dev"][:cfg.dev_examples] + gens["probes"]:
        assert ex["before"] and ex["after"] and ex["before"] != ex["after"]
        assert ex["before"] in md and ex["after"] in md
        assert html.escape(ex["after"], quote=False) in page
    assert md.count("### Dev example") == cfg.dev_examples and md.count("### Probe") == 2
    assert [ex["scored"] for ex in gens["dev"]] == [True] * 4
    assert f"| ROUGE-L | {res.metrics['base_rouge_l']:.2f} | " in md

    # HTML: self-contained, UTF-8, autoescaped prompt text; markdown extra rendered as a table
    assert '<meta charset="utf-8">' in page and "<script>" not in page
    assert "&lt;script&gt;" in page and "&lt;b&gt;粗体&lt;/b&gt;" in page
    assert "<table>" in page or "<pre>" in page
    assert '[system]</span> 你是一个植物养护助手。\n<span class="role">[user]' in page
    assert "[system] 你是一个植物养护助手。\n[user] 多肉植物多久浇一次水？" in md

    # another section re-renders from the same file: a new report, the same answers
    again = render_report(res.out.generations_json, {"Benchmark": "other"})
    assert again.digest != report.digest
    assert Path(again.files["report_md"]).read_text(encoding="utf-8").rstrip().endswith("other")

    m = res.metrics
    assert (m["dev_examples"], m["eval_examples"], m["probe_count"]) == (3, 4, 2)
    for who in ("base", "tuned"):
        for key in ("rouge_1", "rouge_2", "rouge_l", "bleu_4"):
            assert 0 <= m[f"{who}_{key}"] <= 100
        assert 0 <= m[f"{who}_eos_rate"] <= 1 and m[f"{who}_mean_answer_chars"] > 0
        assert 0 < m[f"{who}_mean_new_tokens"] <= cfg.max_new_tokens
        assert (m[f"{who}_eos_rate"] == 0) == (m[f"{who}_mean_new_tokens"] == cfg.max_new_tokens)
    assert all(isinstance(v, float) and "-" not in k for k, v in m.items())


def test_after_preference_tuning_the_report_has_a_supervised_column(inputs):
    """base | supervised | tuned: the supervised model (a third model here) answers the same
    prompts, is scored the same way and is shown between the two."""
    third = make_tiny_chat_model(inputs["base"].parent / "supervised", seed=2)
    cfg = _cfg(inputs["probes"])
    res = generate_answers(ModelSpec(inputs["base"]), ModelSpec(inputs["tuned"]), inputs["dev"],
                           inputs["probes"], cfg, supervised=ModelSpec(third))
    gens = read_json(res.files["generations_json"])
    assert list(gens["labels"]) == ["base", "supervised", "tuned"]
    for ex in gens["dev"][:cfg.dev_examples] + gens["probes"]:
        assert len({ex["before"], ex["supervised"], ex["after"]}) == 3
    assert 0 <= res.metrics["supervised_rouge_l"] <= 100
    md = Path(render_report(res.out.generations_json).files["report_md"]).read_text(
        encoding="utf-8")
    m = res.metrics
    assert "| metric | before | supervised | after | Δ |" in md
    assert f"| ROUGE-L | {m['base_rouge_l']:.2f} | {m['supervised_rouge_l']:.2f} | " \
           f"{m['tuned_rouge_l']:.2f} |" in md
    assert md.count("**Supervised (before preference tuning)**") == cfg.dev_examples + 2
    page = Path(render_report(res.out.generations_json).files["report_html"]).read_text(
        encoding="utf-8")
    assert page.count('class="text supervised"') == cfg.dev_examples + 2
    assert "<th>supervised</th>" in page


def test_identical_models_score_identically(inputs):
    spec = ModelSpec(inputs["base"], "float32")
    res = generate_answers(spec, spec, inputs["dev"], inputs["probes"],
                           _cfg(inputs["probes"]))
    m = res.metrics
    for key in ("rouge_1", "rouge_2", "rouge_l", "bleu_4", "mean_answer_chars", "eos_rate"):
        assert m[f"base_{key}"] == m[f"tuned_{key}"]
    gens = read_json(res.files["generations_json"])
    assert all(ex["before"] == ex["after"] for ex in gens["dev"] + gens["probes"])


def test_empty_answers_that_end_with_eos(inputs, tmp_path):
    mute = make_tiny_chat_model(tmp_path / "mute", seed=2, mute=True)
    cfg = _cfg(inputs["probes"])
    res = generate_answers(ModelSpec(inputs["base"]), ModelSpec(mute), inputs["dev"],
                           inputs["probes"], cfg)
    m = res.metrics
    assert m["tuned_eos_rate"] == 1 and m["tuned_mean_new_tokens"] == 1
    assert m["tuned_mean_answer_chars"] == 0
    assert all(m[f"tuned_{k}"] == 0 for k in ("rouge_1", "rouge_2", "rouge_l", "bleu_4"))
    assert m["base_mean_new_tokens"] > 1 and m["base_mean_answer_chars"] > 0
    gens = read_json(res.files["generations_json"])
    assert all(ex["after"] == "" for ex in gens["dev"] + gens["probes"])
