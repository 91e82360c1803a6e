"""Stage 4, data report: what went in, what came out, and what the texts look like.

Counts (files, records read, skipped with reasons, duplicates dropped, train/dev), length
distributions in characters and in tokens (histogram PNGs, which MLflow shows as images),
turns per conversation and a short sample, as data_report.md / data_report.json.

Tokens are counted with the tokenizer given (a local Hugging Face tokenizer folder, e.g. the
base model's), or else as jieba words; the report names the unit. Characters are counted on
every record, tokens on at most TOKEN_SAMPLE evenly spaced records per split (tokenizing a
million texts would take longer than the whole data stage).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.runtime.results import Metrics, StageName, StageResult, stage_entry, stage_output, \
    stage_root
from tasks.runtime.files import (
    atomic_write_json,
    atomic_write_text,
    publish_dir,
    read_json,
    staging_dir,
)
from tasks.data.dataset_io import read_parquet, single, turns

if TYPE_CHECKING:       # the outputs this stage reads (not part of its cache key's code)
    from tasks.data.conversations import Conversations
    from tasks.data.ingest import Ingested

TOKEN_SAMPLE = 5000
ROLES = ("user", "assistant")
Counter_ = Callable[[list[str]], np.ndarray]


def token_counter(tokenizer: Any | None, source: str | None = None) -> tuple[str, Counter_]:
    """(unit name, texts -> token counts): the given tokenizer (loaded from `source`), else
    jieba words."""
    if tokenizer is not None:
        unit = f"tokens of {type(tokenizer).__name__} from {source} (vocabulary " \
               f"{len(tokenizer):,})"
        return unit, lambda texts: np.array(
            [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]], int)
    import jieba

    jieba.setLogLevel(logging.WARNING)
    unit = (f"jieba words (jieba {getattr(jieba, '__version__', '?')}, default dictionary, "
            "precise mode, white space not counted): no tokenizer was configured")
    return unit, lambda texts: np.array(
        [sum(1 for w in jieba.cut(t) if not w.isspace()) for t in texts], int)


def _stats(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {"n": 0}
    p50, p95 = np.percentile(values, [50, 95])
    return {"n": int(len(values)), "min": int(values.min()), "mean": round(float(
        values.mean()), 1), "p50": round(float(p50), 1), "p95": round(float(p95), 1),
        "max": int(values.max())}


def _texts_by_role(conversations: pa.Array) -> dict[str, pa.Array]:
    _, roles, contents = turns(conversations)
    return {role: contents.filter(pc.equal(roles, role)) for role in ROLES}


def _histograms(path: Path, title: str, unit: str,
                series: dict[str, dict[str, np.ndarray]]) -> None:
    """One panel per role, train and dev overlaid; each histogram one filled outline
    (`histtype="stepfilled"`: the same picture as bars, drawn as one patch instead of one per
    bin, for about a third less CPU: benchmarks/histogram_cpu.py)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ROLES), figsize=(11, 4), constrained_layout=True)
    for ax, role in zip(axes, ROLES):
        data = {split: v[role] for split, v in series.items() if len(v[role])}
        if data:
            top = max(int(np.percentile(np.concatenate(list(data.values())), 99.5)), 1)
            bins = np.linspace(0, top, min(60, top + 1))
            for split, values in data.items():
                ax.hist(np.minimum(values, top), bins=bins, alpha=0.6, histtype="stepfilled",
                        label=f"{split} (n={len(values):,})")
            ax.legend()
        ax.set_title(f"{role} messages")
        ax.set_xlabel(unit)
        ax.set_ylabel("messages")
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _turns_chart(path: Path, counts: dict[str, dict[int, int]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    width = 0.4
    for k, (split, by_size) in enumerate(counts.items()):
        ax.bar(np.array(list(by_size)) + (k - 0.5) * width, list(by_size.values()),
               width=width, label=split)
    ax.set_xticks(sorted({size for by_size in counts.values() for size in by_size}))
    ax.set_xlabel("turns per conversation")
    ax.set_ylabel("conversations")
    ax.legend()
    fig.suptitle("Turns per conversation")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _markdown(report: dict) -> str:
    c = report["counts"]
    lines = ["# Data report", "", f"Source: `{report['source']}` ({report['format']}, "
             f"{c['files']} file(s))", "", "Split: " + ", ".join(
                 f"{k}={v}" for k, v in report["split"].items()), "",
             "| | records |", "|---|---|",
             f"| read | {c['read']:,} |", f"| skipped as malformed | {c['skipped']:,} |",
             f"| duplicates dropped | {c['duplicates_dropped']:,} |",
             f"| train | {c['train']:,} |", f"| dev | {c['dev']:,} |", ""]
    if report["skipped"]:
        lines += ["## Skipped records", "", "| reason | count |", "|---|---|"]
        lines += [f"| {k} | {n:,} |" for k, n in report["skipped"].items()]
        lines += [""] + [f"- {e['message']}" for e in report["skipped_examples"][:10]] + [""]
    if report["duplicate_examples"]:
        lines += ["## Duplicates", ""] + [f"- {e['record']} duplicates {e['duplicate_of']}"
                                          for e in report["duplicate_examples"][:10]] + [""]
    for key, title in (("chars", "Length in characters"), ("tokens", "Length in tokens")):
        lines += [f"## {title}", ""]
        if key == "tokens":
            lines += [f"Unit: {report['token_unit']}. {report['token_sample']}", ""]
        lines += ["| split | role | n | min | mean | p50 | p95 | max |",
                  "|---|---|---|---|---|---|---|---|"]
        for split, by_role in report[key].items():
            for role, s in by_role.items():
                lines.append(f"| {split} | {role} | " + " | ".join(
                    str(s.get(k, "")) for k in ("n", "min", "mean", "p50", "p95", "max")) + " |")
        lines += ["", f"![{title}]({key}_hist.png)", ""]
    lines += ["## Turns per conversation", "", "| split | turns: conversations |", "|---|---|"]
    lines += [f"| {split} | {', '.join(f'{k}: {v:,}' for k, v in t.items())} |"
              for split, t in report["turns"].items()]
    lines += ["", "![turns](turns_hist.png)", "", "## Sample (first train records)", "",
              "```json"] + [json.dumps(r, ensure_ascii=False)[:1000] for r in report["sample"]] \
        + ["```", ""]
    return "\n".join(lines)


@stage_output
class DataReport:
    """The report's files; its counts and the train split's lengths per role (mean, p95) as
    metrics ("<count>_records", "train_<role>_<chars|tokens>_<mean|p95>")."""

    data_report_md: Path
    data_report_json: Path
    chars_hist_png: Path
    tokens_hist_png: Path
    turns_hist_png: Path
    figures: Metrics
    token_unit: str
    counts: dict[str, int]


def build_data_report(ingest: Ingested, data: Conversations, tokenizer: Any | None = None,
                      tokenizer_source: str | None = None) -> StageResult:
    """Report on the ingested and split data set (see the module docstring); token lengths in
    `tokenizer`'s tokens (a loaded tokenizer, from the folder `tokenizer_source`) if given."""
    unit, count_tokens = token_counter(tokenizer, tokenizer_source)
    chars, tokens, turn_counts, sample, notes = {}, {}, {}, [], []
    char_series, token_series = {}, {}
    for split in ("train", "dev"):
        parquet = data.train_parquet if split == "train" else data.dev_parquet
        convs = single(read_parquet(parquet).column("conversations"))
        if split == "train":
            sample = [{"conversations": c} for c in convs.slice(0, 3).to_pylist()]
        by_role = _texts_by_role(convs)
        char_series[split] = {r: pc.utf8_length(t).to_numpy(zero_copy_only=False)
                              for r, t in by_role.items()}
        token_series[split] = {}
        for role, texts in by_role.items():
            at = np.unique(np.linspace(0, len(texts) - 1, min(TOKEN_SAMPLE, len(texts)))
                           .astype(int)) if len(texts) else np.zeros(0, int)
            token_series[split][role] = count_tokens(texts.take(at).to_pylist()) \
                if len(at) else np.zeros(0, int)
            if len(at) < len(texts):
                notes.append(f"{split} {role}: {len(at):,} of {len(texts):,}")
        chars[split] = {r: _stats(v) for r, v in char_series[split].items()}
        tokens[split] = {r: _stats(v) for r, v in token_series[split].items()}
        sizes, n = np.unique(pc.list_value_length(convs).to_numpy(zero_copy_only=False),
                             return_counts=True)
        turn_counts[split] = dict(zip(sizes.tolist(), n.tolist()))
    report = {
        "source": ingest.source, "format": ingest.format,
        "counts": {"files": ingest.input_files, "read": ingest.records + ingest.skipped_records,
                   "skipped": ingest.skipped_records,
                   "duplicates_dropped": data.duplicates_dropped,
                   "train": data.train_records, "dev": data.dev_records},
        "skipped": ingest.skipped,
        "skipped_examples": read_json(ingest.skipped_json)["examples"]
        if ingest.skipped_json else [],
        "duplicate_examples": read_json(data.duplicates_json)["examples"]
        if data.duplicates_json else [],
        "ignored_fields": ingest.ignored_fields, "ignored_files": ingest.ignored_files,
        "split": {"train_ratio": data.train_ratio, "shuffle_seed": data.shuffle_seed,
                  "split_by": data.split_by},
        "chars": chars, "tokens": tokens, "token_unit": unit,
        "token_sample": ("Tokens counted on evenly spaced samples: " + "; ".join(notes) + ".")
        if notes else "Tokens counted on every message.",
        "turns": turn_counts, "sample": sample}
    with staging_dir(stage_root(StageName.DATA_REPORT)) as tmp:
        _histograms(tmp / "chars_hist.png", "Message length in characters", "characters",
                    char_series)
        _histograms(tmp / "tokens_hist.png", "Message length in tokens",
                    unit.split(" (")[0], token_series)
        _turns_chart(tmp / "turns_hist.png", turn_counts)
        atomic_write_json(tmp / "data_report.json", report)
        atomic_write_text(tmp / "data_report.md", _markdown(report))
        out, digest = publish_dir(tmp, stage_root(StageName.DATA_REPORT))
    figures = {f"{k}_records": float(v) for k, v in report["counts"].items() if k != "files"}
    for key, stats in (("chars", chars), ("tokens", tokens)):
        for role in ROLES:
            s = stats["train"][role]
            if s.get("n"):
                figures[f"train_{role}_{key}_mean"] = float(s["mean"])
                figures[f"train_{role}_{key}_p95"] = float(s["p95"])
    return StageResult(stage=StageName.DATA_REPORT, path=str(out), digest=digest, out=DataReport(
        data_report_md=out / "data_report.md", data_report_json=out / "data_report.json",
        chars_hist_png=out / "chars_hist.png", tokens_hist_png=out / "tokens_hist.png",
        turns_hist_png=out / "turns_hist.png", figures=figures, token_unit=unit,
        counts=report["counts"]))


@stage_entry(StageName.DATA_REPORT)
def stage(qa: StageResult, data: StageResult, tokenizer: Path | None = None) -> StageResult:
    """The stage over the ingest and conversations stages' results. `tokenizer`: a model
    folder whose tokens the lengths are counted in (loaded here, not where the data stages
    are imported, so that they never import the model's code)."""
    from tasks.model.tokenizer import data_tokenizer

    tok = data_tokenizer(tokenizer) if tokenizer else None
    return build_data_report(qa.out, data.out, tok, str(tokenizer) if tokenizer else None)
