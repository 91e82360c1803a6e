"""Stage "preference_data": preference pairs for DPO / ORPO -- a prompt, the answer people
prefer (chosen) and one they do not (rejected) -- held to the data stage's standard
(README "Preference tuning"). Three formats, JSON arrays or JSON Lines, detected from the
records (`preference.format` to say it):

* `trl`: `{"prompt", "chosen", "rejected"}`, each a text or a list of messages, TRL's standard
  preference format (https://huggingface.co/docs/trl/dataset_formats);
* `alpaca_ranking`: `{"instruction", "input", "chosen", "rejected"}` with optional `system`
  and `history` ([question, answer] pairs), LLaMA-Factory's ranking format;
* `sharegpt_ranking`: `{"conversations": [{"from", "value"}, ...], "chosen": {"from",
  "value"}, "rejected": {...}}` with an optional `system`, LLaMA-Factory's sharegpt ranking.

Every pair becomes `{"prompt": [messages ending on a user turn], "chosen": text, "rejected":
text}`. A record that cannot be one is refused naming its file, line and record: chosen
identical to rejected, an empty side, a prompt that ends on an assistant turn, a missing or
mistyped field (or skipped and counted, `preference.on_error=skip`). Exact duplicates are
dropped and counted. The pairs are split exactly as the conversations are (70/30 by default),
validated against schemas/preference.schema.json, and described in a report (counts, lengths,
skipped and duplicate records). Output: train_pairs.json, dev_pairs.json, preference_report.json
and .md under outputs/preference_data/<digest>/.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Literal

from tasks.data.conversations import split_indices
from tasks.data.records import SHAREGPT_ROLES, BadRecord, prompt_messages, type_name
from tasks.data.sources import ArrayLines, Issues, discover, json_records, read_text_bytes
from tasks.data.validate import load_schema
from tasks.runtime.errors import DataError
from tasks.runtime.files import atomic_write_json, atomic_write_text, publish_dir, \
    staging_dir
from tasks.runtime.paths import DATA_DIR
from tasks.runtime.results import Metrics, StageName, StageResult, stage_entry, stage_output, \
    stage_root

PreferenceFormat = Literal["auto", "trl", "alpaca_ranking", "sharegpt_ranking"]
KEYS = {"trl": {"prompt", "chosen", "rejected"},
        "alpaca_ranking": {"instruction", "chosen", "rejected"},
        "sharegpt_ranking": {"conversations", "chosen", "rejected"}}
SAMPLE = DATA_DIR / "sample" / "plant_care_preferences.jsonl"
SKIP_HINT = ("fix the record, or set preference.on_error=skip to skip malformed pairs (they are "
             "counted and listed in the preference report)")


@stage_output
class PreferencePairs:
    """The train/dev preference pairs, their report, and its counts as "<count>_pairs"."""

    train_pairs_json: Path
    dev_pairs_json: Path
    preference_report_json: Path
    preference_report_md: Path
    counts: Metrics
    source: str


def detect(record: Any) -> str:
    """The format whose keys a record has (`BadRecord` if none, or several, match)."""
    if not isinstance(record, dict):
        raise BadRecord("wrong-type", "", f"is {type_name(record)}, expected an object")
    found = [name for name, keys in KEYS.items() if keys <= record.keys()]
    if len(found) != 1:
        raise BadRecord("unknown-format", "", f"has the fields {sorted(record)}, which match "
                      + ("no preference format: expected prompt/chosen/rejected (trl), "
                         "instruction/chosen/rejected (alpaca_ranking) or "
                         "conversations/chosen/rejected (sharegpt_ranking)" if not found else
                         f"several formats ({', '.join(found)}): set preference.format"))
    return found[0]


def _text(value: Any, path: str) -> str:
    """A side or a message's content: text, or a list of one assistant message (TRL's
    conversational form), or a sharegpt message object."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value, path = value[0], f"{path}[0]"
    if isinstance(value, dict):
        role = value.get("role", value.get("from"))
        if SHAREGPT_ROLES.get(str(role)) != "assistant":
            raise BadRecord("wrong-role", path,
                            f"is a {role!r} message, expected the assistant's answer")
        key = "content" if "content" in value else "value"
        value, path = value.get(key), f"{path}.{key}"
    return _text_field(value, path)


def _prompt(record: dict, fmt: str, field: str) -> list[dict[str, str]]:
    """The prompt of `record` as messages, read by the supervised format `fmt`'s parser
    (tasks/data/records.py `prompt_messages`); a problem is reported at `.<field>...`."""
    try:
        return prompt_messages(record, fmt)
    except BadRecord as e:
        raise BadRecord(e.kind, e.where.replace(".conversations", f".{field}", 1), e.reason) \
            from None


def to_pair(record: Any, fmt: str) -> dict[str, Any]:
    """One record as a pair (`BadRecord` naming the field when it cannot be one)."""
    fmt = detect(record) if fmt == "auto" else fmt
    if not isinstance(record, dict) or not KEYS[fmt] <= record.keys():
        missing = sorted(KEYS[fmt] - set(record)) if isinstance(record, dict) else []
        raise BadRecord("missing-field", "",
                        f"lacks {', '.join(missing) or 'its fields'} (format {fmt})")
    if fmt == "trl" and isinstance(record["prompt"], str):
        prompt = [{"role": "user", "content": _text_field(record["prompt"], ".prompt")}]
    elif fmt == "trl":
        prompt = _prompt({"conversations": record["prompt"]}, "conversation", "prompt")
    elif fmt == "alpaca_ranking":
        prompt = _prompt(record, "alpaca", "instruction")
    else:
        prompt = _prompt(record, "sharegpt", "conversations")
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRecord("no-user-turn", ".prompt" if fmt == "trl" else ".conversations",
                        "the prompt ends on " + (f"a {prompt[-1]['role']} turn" if prompt else
                                                 "nothing") + ": the answers need a user turn "
                        "to answer")
    chosen, rejected = _text(record["chosen"], ".chosen"), _text(record["rejected"], ".rejected")
    if chosen.strip() == rejected.strip():
        raise BadRecord("same-answer", ".rejected",
                        "chosen and rejected are the same answer: the pair teaches nothing")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _text_field(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise BadRecord("wrong-type", path, f"is {type_name(value)}, expected a text")
    if not value.strip():
        raise BadRecord("empty", path, "is empty")
    return value


def read_pairs(source: Path, fmt: PreferenceFormat = "auto", on_error: str = "fail"
               ) -> tuple[list[dict[str, Any]], Issues]:
    """The pairs of every file of `source`, in file order, and what was skipped."""
    files, _ = discover(Path(source))
    issues, pairs = Issues(on_error), []
    for path in files:
        raw = read_text_bytes(path)
        lines = ArrayLines(raw)
        found = fmt
        for index, line, record in json_records(path, raw, issues):
            try:
                if found == "auto":
                    found = detect(record)
                pairs.append(to_pair(record, found))
            except BadRecord as e:
                issues.report(e.kind, e.error(path, record=index, line=line, lines=lines,
                                              hint=SKIP_HINT if on_error == "fail" else None))
    if not pairs:
        raise DataError(source, "holds no preference pair" + (
            f" ({issues.skipped} skipped)" if issues.skipped else ""))
    return pairs, issues


def _lengths(pairs: list[dict], key: str) -> dict[str, float]:
    sizes = [len(p[key]) if isinstance(p[key], str) else sum(len(m["content"]) for m in p[key])
             for p in pairs]
    return {"n": len(sizes), "min": min(sizes), "mean": round(statistics.fmean(sizes), 1),
            "max": max(sizes)} if sizes else {"n": 0}


def _markdown(report: dict) -> str:
    c = report["counts"]
    lines = ["# Preference pairs", "", f"Source: `{report['source']}`", "",
             f"- pairs read: {c['read']}, skipped: {c['skipped']}, exact duplicates dropped: "
             f"{c['duplicates']}", f"- train: {c['train']}, dev: {c['dev']}", "",
             "| part | n | min | mean | max characters |", "|---|---:|---:|---:|---:|"]
    for key, s in report["lengths"].items():
        lines.append(f"| {key} | {s['n']} | {s.get('min', '-')} | {s.get('mean', '-')} | "
                     f"{s.get('max', '-')} |")
    for example in report["skipped_examples"][:10]:
        lines += ["", f"Skipped: {example['message']}"]
    return "\n".join(lines) + "\n"


@stage_entry(StageName.PREFERENCE_DATA)
def build_preferences(source: Path, fmt: PreferenceFormat = "auto", on_error: str = "fail",
                      train_ratio: float = 0.7, shuffle_seed: int | None = None) -> StageResult:
    """Read, deduplicate, split, validate and describe the preference pairs of `source`."""
    import jsonschema

    pairs, issues = read_pairs(source, fmt, on_error)
    unique, seen = [], set()
    for pair in pairs:
        key = json.dumps(pair, ensure_ascii=False, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(pair)
    try:
        train_at, dev_at = split_indices(len(unique), train_ratio, shuffle_seed)
    except ValueError as e:
        raise DataError(source, str(e), hint="a train/dev split needs at least 2 distinct "
                                             "pairs") from None
    parts = {"train": [unique[i] for i in train_at], "dev": [unique[i] for i in dev_at]}
    validator = jsonschema.Draft202012Validator(load_schema("preference"))
    for name, part in parts.items():
        error = next(validator.iter_errors(part), None)
        if error is not None:                       # our own output broke its contract
            raise RuntimeError(f"{name} pairs fail schemas/preference.schema.json at "
                               f"{error.json_path}: {error.message}")
    report = {"source": str(source),
              "counts": {"read": len(pairs), "skipped": issues.skipped,
                         "duplicates": len(pairs) - len(unique), "train": len(parts["train"]),
                         "dev": len(parts["dev"])},
              "skipped_by_kind": dict(issues.counts), "skipped_examples": issues.examples,
              "lengths": {k: _lengths(unique, k) for k in ("prompt", "chosen", "rejected")},
              "split": {"train_ratio": train_ratio, "shuffle_seed": shuffle_seed}}
    root = stage_root(StageName.PREFERENCE_DATA)
    with staging_dir(root) as tmp:
        for name, part in parts.items():
            atomic_write_json(tmp / f"{name}_pairs.json", part)
        atomic_write_json(tmp / "preference_report.json", report)
        atomic_write_text(tmp / "preference_report.md", _markdown(report))
        out, digest = publish_dir(tmp, root)
    return StageResult(stage=StageName.PREFERENCE_DATA, path=str(out), digest=digest,
                       out=PreferencePairs(
        train_pairs_json=out / "train_pairs.json", dev_pairs_json=out / "dev_pairs.json",
        preference_report_json=out / "preference_report.json",
        preference_report_md=out / "preference_report.md",
        counts={f"{k}_pairs": float(v) for k, v in report["counts"].items()},
        source=str(source)))


#: what the sample's chosen answers add: a closing line inviting a follow-up question
FOLLOW_UP = "如果还有其他问题，欢迎继续问我。"


def sample_pairs(qa: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The embedded default's pairs, from the sample's Q/A: a style preference the supervised
    data does not have. The chosen answer is the sample's answer followed by FOLLOW_UP, the
    rejected one the answer alone -- what the supervised model has learnt to say. Shared by
    every pair, the preference carries over to dev questions the tuning never saw (README
    "Preference tuning")."""
    return [{"prompt": [{"role": "user", "content": p["q"]}],
             "chosen": f"{p['a'].rstrip()}{FOLLOW_UP}", "rejected": p["a"].rstrip()}
            for p in qa]


if __name__ == "__main__":                       # regenerate the committed sample file
    from tasks.data.qa_text import read_qa_text

    rows = sample_pairs(read_qa_text(DATA_DIR / "sample" / "plant_care_qa.txt"))
    SAMPLE.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                      encoding="utf-8")
    print(SAMPLE, len(rows))
