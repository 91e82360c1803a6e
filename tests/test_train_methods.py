"""Stage "train", per method, on the embedded default (README "Two commands" table): the sample corpus split
70/30 and the ~2M-parameter base built from it, exactly as `PipelineConfig()` makes them. Each
of lora, qlora and ptuning, with its default settings, must lower the dev loss and beat the base
on dev ROUGE-L, scored by the generations stage's core on the same dev prompts as the pipeline's
before/after report; the sanity dump and loss curve must show what was learned."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tasks.base_model import build_base_model
from tasks.config import PipelineConfig
from tasks.conversations import build_conversations
from tasks.ingest import ingest
from tasks.methods import METHODS
from tasks.model_spec import ModelSpec
from tasks.generations import generate_answers
from tasks.train import train_adapter

DEFAULT = PipelineConfig()
#: dev loss before -> after training with each method's defaults, measured on the 2-core CPU
#: (2026-11-29, torch 2.13 CPU, transformers 5.24, peft 0.21.2, bitsandbytes 0.50.2). Pinned, as
#: torchtune pins its recipes' losses: a change that still lowers the loss, but less (a partial
#: regression, like the silent loss of QLoRA gradients through 4-bit layers), fails here.
PINNED_DEV_LOSS = {"lora": (5.974, 5.497), "qlora": (5.949, 5.506), "ptuning": (5.912, 5.747)}
LOSS_TOLERANCE = 0.02

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> dict:
    """The embedded default's data and base, built by the pipeline's own stage cores."""
    home = tmp_path_factory.mktemp("embedded-default")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_HOME", str(home))
        d = DEFAULT.data
        qa = ingest(d.source, d.format, d.on_error, d.max_chars)
        split = build_conversations(qa.file("records_arrow"), d.system_prompt, d.train_ratio,
                                    d.shuffle_seed, d.split_by, d.duplicates)
        base = build_base_model(split.file("train_json"), DEFAULT.base)
    return {"home": home, "train": split.file("train_json"), "dev": split.file("dev_json"),
            "base": base.path}


@pytest.mark.parametrize("method", ["lora", "qlora", "ptuning"])
def test_method_beats_the_base_on_dev(embedded, method, monkeypatch):
    monkeypatch.setenv("PIPELINE_HOME", str(embedded["home"]))
    cfg = DEFAULT.train.model_copy(update={"method": method})
    res = train_adapter(embedded["base"], embedded["train"], embedded["dev"], cfg)
    out, m = Path(res.path), res.metrics
    assert res.info["method"] == method and res.info["checkpoints"]
    assert m["eval_loss_after"] < m["eval_loss_before"], m
    before, after = PINNED_DEV_LOSS[method]
    assert m["eval_loss_before"] == pytest.approx(before, abs=LOSS_TOLERANCE), m
    assert m["eval_loss_after"] == pytest.approx(after, abs=LOSS_TOLERANCE), m
    assert m["perplexity_after"] < m["perplexity_before"]
    assert 0 < m["trainable_params"] < m["total_params"]

    # what is learned: assistant tokens and the closing eos, nothing of the prompt
    rows = list(csv.DictReader((out / "sanity_check.tsv").open(encoding="utf-8"),
                               delimiter="\t"))
    assert {r["example"] for r in rows} == {str(i) for i in range(cfg.sanity_examples)}
    learned = [r for r in rows if r["learned"] == "yes"]
    assert learned and all(r["label"] == r["token_id"] for r in learned)
    assert all(r["label"] == "-100" for r in rows if r["learned"] == "no")
    assert learned[-1]["token"] == "</s>"
    assert "**" in (out / "sanity_check.md").read_text(encoding="utf-8")
    png = (out / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # before/after on the report's dev prompts, the tuned model as it was trained
    tuned = ModelSpec(embedded["base"], adapter=res.path,
                      quantization=METHODS[method].serving_quantization(cfg))
    report = generate_answers(ModelSpec(embedded["base"]), tuned, embedded["dev"],
                              DEFAULT.report.probes_file, DEFAULT.report)
    r = report.metrics
    assert r["eval_examples"] == DEFAULT.report.eval_examples
    print(f"{method}: dev loss {m['eval_loss_before']:.3f} -> {m['eval_loss_after']:.3f}, "
          f"dev ROUGE-L {r['base_rouge_l']:.2f} -> {r['tuned_rouge_l']:.2f}")
    assert r["tuned_rouge_l"] > r["base_rouge_l"], r
