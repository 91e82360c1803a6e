"""Stage "report": the before/after comparison users of QLoRA tutorials expect ("微调前后推理对比")
with out-of-domain checks for catastrophic forgetting ("灾难性遗忘").

Base and tuned model answer the same dev prompts and out-of-domain probes (greedy, one model in
memory at a time); the dev answers are scored against the references with ROUGE-1/2/L F1
(rouge-chinese on jieba words) and BLEU-4 (nltk, characters, smoothing method3), as ChatGLM's
ptuning main.py and LLaMA-Factory do. Outputs: report.md, report.html (jinja2, autoescaped) and
generations.json.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import jieba
import torch
from jinja2 import Environment
from markdown_it import MarkdownIt
from markupsafe import Markup
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from tasks.common import DataError, StageResult, atomic_write_json, atomic_write_text, \
    publish_dir, read_json, stage_root, staging_dir
from tasks.config import ReportConfig
from tasks.model_spec import ModelSpec
from tasks.modeling import Message, answer, load_tokenizer, pick_device, release

jieba.setLogLevel(logging.WARNING)
SCORES = {"rouge_1": "ROUGE-1", "rouge_2": "ROUGE-2", "rouge_l": "ROUGE-L", "bleu_4": "BLEU-4"}
_ROUGE = Rouge()
#: a CPU model below this size decodes faster on one thread: its per-token matmuls are too small
#: to split, and on 2 busy cores intra-op threads made decoding ~8x slower (75 vs 9.6 ms/token)
SMALL_MODEL_PARAMS = 50_000_000


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def score_answer(hypothesis: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 and BLEU-4 of one answer, each in [0, 100]; an empty answer scores 0."""
    hyp = " ".join(jieba.cut(hypothesis.strip()))
    ref = " ".join(jieba.cut(reference.strip()))
    scores = dict.fromkeys(SCORES, 0.0)
    if not hyp.split() or not ref.split():
        return scores
    try:
        rouge = _ROUGE.get_scores(hyp, ref)[0]
    except ValueError:                      # e.g. text that rouge-chinese splits into nothing
        rouge = None
    if rouge:
        for key, name in (("rouge_1", "rouge-1"), ("rouge_2", "rouge-2"), ("rouge_l", "rouge-l")):
            scores[key] = 100.0 * rouge[name]["f"]
    with warnings.catch_warnings():         # nltk warns about zero n-gram overlaps
        warnings.simplefilter("ignore")
        scores["bleu_4"] = 100.0 * sentence_bleu([list(reference.strip())],
                                                 list(hypothesis.strip()),
                                                 smoothing_function=SmoothingFunction().method3)
    return scores


def mean_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Average of `score_answer` over aligned answers (0 for an empty list)."""
    rows = [score_answer(h, r) for h, r in zip(hypotheses, references, strict=True)]
    return {k: sum(r[k] for r in rows) / len(rows) if rows else 0.0 for k in SCORES}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def read_dev_prompts(dev_json: Path) -> list[tuple[list[Message], str]]:
    """(prompt messages, reference) per record: the conversation up to its LAST assistant turn
    (system and earlier turns included) and that turn's content."""
    data = read_json(dev_json)
    if not isinstance(data, list) or not data:
        raise DataError(dev_json, "expected a non-empty JSON array of {'conversations': [...]} "
                                  "records")
    out = []
    for i, rec in enumerate(data):
        turns = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(turns, list) or not all(
                isinstance(t, dict) and isinstance(t.get("role"), str)
                and isinstance(t.get("content"), str) for t in turns):
            raise DataError(dev_json, "expected {'conversations': [{'role', 'content'}, ...]}",
                            record=i)
        last = max((j for j, t in enumerate(turns) if t["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise DataError(dev_json, "needs an assistant turn after at least one other turn",
                            record=i)
        out.append(([{"role": t["role"], "content": t["content"]} for t in turns[:last]],
                    turns[last]["content"]))
    return out


def read_probes(probes_file: Path) -> list[str]:
    """One question per line; blank lines ignored."""
    path = Path(probes_file)
    if not path.is_file():
        raise DataError(path, "probe file not found")
    probes = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    probes = [p for p in probes if p]
    if not probes:
        raise DataError(path, "no probe questions: expected one question per line")
    return probes


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def answer_prompts(spec: ModelSpec, prompts: list[list[Message]], max_new_tokens: int
                   ) -> dict[str, Any]:
    """Load one model from its spec (on the GPU where there is one), answer every prompt
    greedily (`tasks.modeling.answer`), free it again. `new_tokens` counts each answer's tokens,
    its EOS included, so "ended with eos before max_new_tokens" is exact."""
    device = pick_device("auto")
    model = spec.load(device)
    tokenizer = load_tokenizer(spec.tokenizer_dir())
    threads = torch.get_num_threads()
    if (next(model.parameters()).device.type == "cpu"
            and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS):
        torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        answers = answer(model, tokenizer, prompts, max_new_tokens)
    finally:
        seconds = time.perf_counter() - start
        torch.set_num_threads(threads)
        del model
        release(device)
    return {"answers": [a.text for a in answers], "new_tokens": [a.new_tokens for a in answers],
            "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _fence(text: str) -> str:
    """A fenced text block that survives backticks inside `text`."""
    run = longest = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _prompt_text(messages: Sequence[Message]) -> str:
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)


def _markdown(ctx: dict) -> str:
    lines = [f"# {ctx['title']}", "",
             f"Before: `{ctx['base_label']}` · after: `{ctx['tuned_label']}` · greedy decoding, "
             f"max_new_tokens={ctx['max_new_tokens']} · scores over {ctx['eval_examples']} dev "
             f"prompts.", "", f"## Scores ({ctx['eval_examples']} dev prompts)", "",
             "| metric | before | after | Δ |", "|---|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['base']:.2f} | {r['tuned']:.2f} | "
              f"{r['tuned'] - r['base']:+.2f} |" for r in ctx["rows"]]
    lines += ["", "## Dev examples: before / after", ""]
    for i, ex in enumerate(ctx["examples"], 1):
        lines += [f"### Dev example {i}", "", "**Prompt**", "", _fence(_prompt_text(ex["prompt"])),
                  "", "**Reference**", "", _fence(ex["reference"]), "",
                  "**Before (base)**", "", _fence(ex["before"]), "",
                  "**After (tuned)**", "", _fence(ex["after"]), ""]
    lines += ["## Out-of-domain probes (catastrophic forgetting)", ""]
    for i, pr in enumerate(ctx["probes"], 1):
        lines += [f"### Probe {i}", "", "**Question**", "", _fence(pr["question"]), "",
                  "**Before (base)**", "", _fence(pr["before"]), "",
                  "**After (tuned)**", "", _fence(pr["after"]), ""]
    text = "\n".join(lines)
    for name, body in ctx["extra"].items():
        text += f"\n## {name}\n\n{body}\n"
    return text


def _markdown_to_html(text: str) -> Markup:
    """Markdown -> HTML with raw HTML escaped."""
    return Markup(MarkdownIt("commonmark", {"html": False}).enable("table").render(text))


def _html(ctx: dict) -> str:
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    extra = {name: _markdown_to_html(body) for name, body in ctx["extra"].items()}
    return env.from_string(HTML_TEMPLATE).render(**{**ctx, "extra": extra})


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def build_report(base: ModelSpec, tuned: ModelSpec, dev_json: Path, probes_file: Path,
                 cfg: ReportConfig, title: str = "Fine-tuning report",
                 extra_sections: dict[str, str] | None = None) -> StageResult:
    """Before/after report of the `base` vs the `tuned` model on dev prompts and out-of-domain
    probes -> outputs/report/<digest>/."""
    dev = read_dev_prompts(Path(dev_json))
    probes = read_probes(Path(probes_file))
    n_show, n_eval = min(cfg.dev_examples, len(dev)), min(cfg.eval_examples, len(dev))
    used = dev[:max(n_show, n_eval)]
    prompts = [p for p, _ in used] + [[{"role": "user", "content": q}] for q in probes]

    runs = {"base": answer_prompts(base, prompts, cfg.max_new_tokens),
            "tuned": answer_prompts(tuned, prompts, cfg.max_new_tokens)}
    dev_ans = {k: r["answers"][:len(used)] for k, r in runs.items()}
    probe_ans = {k: r["answers"][len(used):] for k, r in runs.items()}
    refs = [r for _, r in used]
    per_prompt = {k: [score_answer(a, ref) for a, ref in zip(v, refs)] for k, v in dev_ans.items()}

    metrics: dict[str, float] = {"dev_examples": float(n_show), "eval_examples": float(n_eval),
                                 "probe_count": float(len(probes))}
    for k, r in runs.items():
        for key in SCORES:
            metrics[f"{k}_{key}"] = (sum(s[key] for s in per_prompt[k][:n_eval]) / n_eval)
        metrics[f"{k}_mean_answer_chars"] = sum(map(len, r["answers"])) / len(r["answers"])
        metrics[f"{k}_mean_new_tokens"] = sum(r["new_tokens"]) / len(r["new_tokens"])
        metrics[f"{k}_eos_rate"] = (sum(n < cfg.max_new_tokens for n in r["new_tokens"])
                                    / len(r["new_tokens"]))
        metrics[f"{k}_generate_seconds"] = r["seconds"]

    examples = [{"prompt": p, "reference": ref, "before": dev_ans["base"][i],
                 "after": dev_ans["tuned"][i], "scored": i < n_eval,
                 "scores": {"base": per_prompt["base"][i], "tuned": per_prompt["tuned"][i]}}
                for i, (p, ref) in enumerate(used)]
    probe_rows = [{"question": q, "before": probe_ans["base"][i], "after": probe_ans["tuned"][i]}
                  for i, q in enumerate(probes)]
    rows = [{"name": name, "base": metrics[f"base_{key}"], "tuned": metrics[f"tuned_{key}"]}
            for key, name in SCORES.items()]
    rows += [{"name": "mean answer chars", "base": metrics["base_mean_answer_chars"],
              "tuned": metrics["tuned_mean_answer_chars"]},
             {"name": "ended with eos (%)", "base": 100 * metrics["base_eos_rate"],
              "tuned": 100 * metrics["tuned_eos_rate"]}]
    ctx = {"title": title, "base_label": base.label(), "tuned_label": tuned.label(),
           "max_new_tokens": cfg.max_new_tokens, "eval_examples": n_eval, "rows": rows,
           "examples": examples[:n_show], "probes": probe_rows, "extra": extra_sections or {}}
    markdown = _markdown(ctx)

    root = stage_root("report")
    with staging_dir(root) as tmp:
        atomic_write_text(tmp / "report.md", markdown)
        atomic_write_text(tmp / "report.html", _html(ctx))
        atomic_write_json(tmp / "generations.json", {
            "base": base.describe(), "tuned": tuned.describe(),
            "max_new_tokens": cfg.max_new_tokens,
            "eval_examples": n_eval, "dev": examples, "probes": probe_rows,
            "scores": {k: {key: metrics[f"{k}_{key}"] for key in SCORES} for k in runs}})
        out, digest = publish_dir(tmp, root)
    return StageResult(stage="report", path=str(out), digest=digest,
                       files={"report_md": str(out / "report.md"),
                              "report_html": str(out / "report.html"),
                              "generations_json": str(out / "generations.json")},
                       metrics=metrics, info={"markdown": markdown, "device": pick_device()})


HTML_TEMPLATE = """<!doctype html>
<html lang="zh">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", "PingFang SC", "Microsoft YaHei",
       "Noto Sans CJK SC", sans-serif; max-width: 1200px; margin: 2rem auto; padding: 0 1rem;
       color: #1f2328; line-height: 1.6; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
.muted { color: #59636e; font-size: .9rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .8rem; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.up { color: #1a7f37; } .down { color: #cf222e; }
section.item { border: 1px solid #d0d7de; border-radius: 8px; padding: .6rem 1rem 1rem;
               margin: 1rem 0; }
.label { font-weight: 600; font-size: .85rem; color: #59636e; margin: .5rem 0 .2rem; }
.text { white-space: pre-wrap; word-break: break-word; background: #f6f8fa;
        border-radius: 6px; padding: .5rem .7rem; border-left: 4px solid #d0d7de; }
.reference { border-left-color: #0969da; } .before { border-left-color: #bc4c00; }
.after { border-left-color: #1a7f37; } .role { color: #8250df; font-weight: 600; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
@media (max-width: 760px) { .pair { grid-template-columns: 1fr; } }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="muted">Before: <code>{{ base_label }}</code> · after: <code>{{ tuned_label }}</code>
 · greedy decoding, max_new_tokens={{ max_new_tokens }} · scores over {{ eval_examples }} dev
 prompts.</p>

<h2>Scores</h2>
<table>
<tr><th>metric</th><th>before</th><th>after</th><th>Δ</th></tr>
{% for r in rows %}
{% set d = r.tuned - r.base %}
<tr><td>{{ r.name }}</td><td class="num">{{ "%.2f"|format(r.base) }}</td>
<td class="num">{{ "%.2f"|format(r.tuned) }}</td>
<td class="num {{ 'up' if d > 0 else ('down' if d < 0 else '') }}">{{ "%+.2f"|format(d) }}</td></tr>
{% endfor %}
</table>

<h2>Dev examples: before / after</h2>
{% for ex in examples %}
<section class="item">
<h3>Dev example {{ loop.index }}</h3>
<div class="label">Prompt</div>
{% set tagged = ex.prompt|length > 1 or ex.prompt[0].role != "user" %}
<div class="text">{% for m in ex.prompt %}{% if tagged %}<span class="role">[{{ m.role }}]</span> {% endif %}
{{- m.content }}{{ "\n" if not loop.last else "" }}{% endfor %}</div>
<div class="label">Reference</div>
<div class="text reference">{{ ex.reference }}</div>
<div class="pair">
<div><div class="label">Before (base){% if ex.scored %} · ROUGE-L
 {{- " %.1f"|format(ex.scores.base.rouge_l) }}{% endif %}</div>
<div class="text before">{{ ex.before }}</div></div>
<div><div class="label">After (tuned){% if ex.scored %} · ROUGE-L
 {{- " %.1f"|format(ex.scores.tuned.rouge_l) }}{% endif %}</div>
<div class="text after">{{ ex.after }}</div></div>
</div>
</section>
{% endfor %}

<h2>Out-of-domain probes (catastrophic forgetting)</h2>
{% for p in probes %}
<section class="item">
<h3>Probe {{ loop.index }}</h3>
<div class="text">{{ p.question }}</div>
<div class="pair">
<div><div class="label">Before (base)</div><div class="text before">{{ p.before }}</div></div>
<div><div class="label">After (tuned)</div><div class="text after">{{ p.after }}</div></div>
</div>
</section>
{% endfor %}

{% for name, body in extra.items() %}
<h2>{{ name }}</h2>
{{ body }}
{% endfor %}
</body>
</html>
"""
