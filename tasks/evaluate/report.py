"""Stage "report": the before/after report (report.md, report.html: jinja2, autoescaped),
rendered from the generations stage's generations.json (tasks/evaluate/generations.py) plus extra
sections such as the benchmark table. Cheap: no model is loaded, so a changed section
re-renders the report without generating again (docs/design.md "Caching").
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from jinja2 import Environment
from markdown_it import MarkdownIt
from markupsafe import Markup

from tasks.runtime.results import StageName, StageResult, stage_entry, stage_output, stage_root
from tasks.runtime.files import atomic_write_text, publish_dir, read_json, staging_dir
from tasks.evaluate.scoring import COLUMNS, SCORES
from tasks.model.modeling import Message


@stage_output
class Report:
    """The report, as Markdown and as a self-contained HTML page."""

    report_md: Path
    report_html: Path


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


def _answers(item: dict, supervised: bool) -> list[str]:
    """The answers of one example or probe, a block each: base, [supervised,] tuned."""
    out = ["**Before (base)**", "", _fence(item["before"]), ""]
    if supervised:
        out += ["**Supervised (before preference tuning)**", "", _fence(item["supervised"]), ""]
    return out + ["**After (tuned)**", "", _fence(item["after"]), ""]


def _markdown(ctx: dict) -> str:
    sup = ctx["supervised_label"] is not None
    lines = [f"# {ctx['title']}", "",
             f"Before: `{ctx['base_label']}` · "
             + (f"supervised: `{ctx['supervised_label']}` · " if sup else "")
             + f"after: `{ctx['tuned_label']}` · greedy decoding, "
             f"max_new_tokens={ctx['max_new_tokens']} · scores over {ctx['eval_examples']} dev "
             f"prompts.", "", f"## Scores ({ctx['eval_examples']} dev prompts)", "",
             "| metric | before | " + ("supervised | " if sup else "") + "after | Δ |",
             "|---|---:|" + ("---:|" if sup else "") + "---:|---:|"]
    lines += [f"| {r['name']} | {r['base']:.2f} | "
              + (f"{r['supervised']:.2f} | " if sup else "")
              + f"{r['tuned']:.2f} | {r['tuned'] - r['base']:+.2f} |" for r in ctx["rows"]]
    lines += ["", "## Dev examples: before / after", ""]
    for i, ex in enumerate(ctx["examples"], 1):
        lines += [f"### Dev example {i}", "", "**Prompt**", "", _fence(_prompt_text(ex["prompt"])),
                  "", "**Reference**", "", _fence(ex["reference"]), "", *_answers(ex, sup)]
    lines += ["## Out-of-domain probes (catastrophic forgetting)", ""]
    for i, pr in enumerate(ctx["probes"], 1):
        lines += [f"### Probe {i}", "", "**Question**", "", _fence(pr["question"]), "",
                  *_answers(pr, sup)]
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
def render_report(generations_json: Path, extra_sections: dict[str, str] | None = None,
                  title: str = "Fine-tuning report") -> StageResult:
    """report.md and report.html of one generations.json (tasks/evaluate/generations.py), with
    `extra_sections` (title -> markdown) at the end -> outputs/report/<digest>/."""
    gen = read_json(Path(generations_json))
    m = gen["metrics"]
    models = [k for k in COLUMNS if k in gen["labels"]]
    rows = [{"name": name, **{k: m[f"{k}_{key}"] for k in models}}
            for key, name in SCORES.items()]
    rows += [{"name": "mean answer chars", **{k: m[f"{k}_mean_answer_chars"] for k in models}},
             {"name": "ended with eos (%)", **{k: 100 * m[f"{k}_eos_rate"] for k in models}}]
    ctx = {"title": title, "base_label": gen["labels"]["base"],
           "supervised_label": gen["labels"].get("supervised"),
           "tuned_label": gen["labels"]["tuned"], "max_new_tokens": gen["max_new_tokens"],
           "eval_examples": gen["eval_examples"], "rows": rows,
           "examples": gen["dev"][:gen["dev_examples"]], "probes": gen["probes"],
           "extra": extra_sections or {}}
    markdown = _markdown(ctx)
    root = stage_root(StageName.REPORT)
    with staging_dir(root) as tmp:
        atomic_write_text(tmp / "report.md", markdown)
        atomic_write_text(tmp / "report.html", _html(ctx))
        out, digest = publish_dir(tmp, root)
    return StageResult(stage=StageName.REPORT, path=str(out), digest=digest, summary=markdown,
                       out=Report(report_md=out / "report.md", report_html=out / "report.html"))


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
.supervised { border-left-color: #8250df; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
.pair.three { grid-template-columns: 1fr 1fr 1fr; }
@media (max-width: 760px) { .pair, .pair.three { grid-template-columns: 1fr; } }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="muted">Before: <code>{{ base_label }}</code>
{%- if supervised_label %} · supervised: <code>{{ supervised_label }}</code>{% endif %}
 · after: <code>{{ tuned_label }}</code>
 · greedy decoding, max_new_tokens={{ max_new_tokens }} · scores over {{ eval_examples }} dev
 prompts.</p>

<h2>Scores</h2>
<table>
<tr><th>metric</th><th>before</th>{% if supervised_label %}<th>supervised</th>{% endif %}
<th>after</th><th>Δ</th></tr>
{% for r in rows %}
{% set d = r.tuned - r.base %}
<tr><td>{{ r.name }}</td><td class="num">{{ "%.2f"|format(r.base) }}</td>
{% if supervised_label %}<td class="num">{{ "%.2f"|format(r.supervised) }}</td>{% endif %}
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
<div class="pair{{ ' three' if supervised_label }}">
<div><div class="label">Before (base){% if ex.scored %} · ROUGE-L
 {{- " %.1f"|format(ex.scores.base.rouge_l) }}{% endif %}</div>
<div class="text before">{{ ex.before }}</div></div>
{% if supervised_label %}
<div><div class="label">Supervised{% if ex.scored %} · ROUGE-L
 {{- " %.1f"|format(ex.scores.supervised.rouge_l) }}{% endif %}</div>
<div class="text supervised">{{ ex.supervised }}</div></div>
{% endif %}
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
<div class="pair{{ ' three' if supervised_label }}">
<div><div class="label">Before (base)</div><div class="text before">{{ p.before }}</div></div>
{% if supervised_label %}
<div><div class="label">Supervised</div><div class="text supervised">{{ p.supervised }}</div></div>
{% endif %}
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


@stage_entry(StageName.REPORT)
def stage(generations: StageResult, extra_sections: dict[str, str]) -> StageResult:
    """The stage: the generations stage's answers and `extra_sections` (the benchmark
    table, ...), rendered."""
    return render_report(generations.out.generations_json, extra_sections)
