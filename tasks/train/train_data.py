"""Data side of the train stage: conversations -> token ids with assistant-only labels, the
sanity dump of what is learned (as ChatGLM3's `_sanity_check`), and the loss-curve plot.

Conversations are rendered with the model's own chat template, and only the assistant turns are
learned (their content and the template's closing eos / end-of-turn token, so the model learns
to stop). Assistant spans are found by prefix difference, so multi-turn conversations learn
every assistant turn.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from tasks.data.validate import read_conversations
from tasks.runtime.errors import ConfigError
from tasks.runtime.files import atomic_write_bytes, atomic_write_text

IGNORE = -100


def _render(tok: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                        add_generation_prompt=generation_prompt))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_conversation(tokenizer: PreTrainedTokenizerBase, conversation: list[dict],
                        max_length: int, last_turn_only: bool = False) -> dict[str, Any]:
    """Token ids of a conversation (the model's chat template) with assistant-only labels.

    For each assistant turn i, its span in the full rendering starts where the rendering of
    turns[:i] + generation prompt stops agreeing with it, and ends where turns[:i+1] does: the
    content and the template's end-of-turn tokens are learned, everything else is -100.
    `last_turn_only`: only the last assistant turn is labelled (an answer scored after a
    history of earlier turns). Returns input_ids, attention_mask, labels (cut to `max_length`)
    and `truncated`."""
    if isinstance(conversation, dict):
        conversation = conversation["conversations"]
    turns = [{"role": t["role"], "content": t["content"]} for t in conversation]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template: a base model for fine-tuning "
                         "needs one (tokenizer_config.json or chat_template.jinja)")
    ids = _render(tokenizer, turns, False)
    labels = [IGNORE] * len(ids)
    answers = [i for i, turn in enumerate(turns) if turn["role"] == "assistant"]
    for i in answers[-1:] if last_turn_only else answers:
        start = _common_prefix(_render(tokenizer, turns[:i], True), ids)
        end = _common_prefix(_render(tokenizer, turns[:i + 1], False), ids)
        labels[start:end] = ids[start:end]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
            "truncated": truncated}


def encode_file(tok: PreTrainedTokenizerBase, path: Path, max_length: int) -> tuple[list, int, int]:
    """Encoded examples of a conversation file; (examples, #truncated, #dropped: nothing left
    to learn after truncation)."""
    examples, truncated, dropped = [], 0, 0
    for turns in read_conversations(path):
        enc = encode_conversation(tok, turns, max_length)
        truncated += enc.pop("truncated")
        if all(x == IGNORE for x in enc["labels"]):
            dropped += 1
            continue
        examples.append(enc)
    if not examples:
        raise ConfigError(f"train.max_length={max_length}", f"no training example keeps an "
                          f"assistant token within {max_length} tokens (all "
                          f"{dropped} would learn nothing)", hint="raise train.max_length")
    return examples, truncated, dropped


def sanity_table(tok: PreTrainedTokenizerBase, examples: list[dict], n: int) -> str:
    """TSV of the first `n` examples, one row per token: example, position, token id, token
    text, label id (-100 = masked) and whether the token is learned."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["example", "position", "token_id", "token", "label", "learned"])
    for i, ex in enumerate(examples[:n]):
        for pos, (t, lab) in enumerate(zip(ex["input_ids"], ex["labels"])):
            text = tok.convert_ids_to_tokens(t)
            w.writerow([i, pos, t, repr(text)[1:-1], lab, "yes" if lab != IGNORE else "no"])
    return buf.getvalue()


def sanity_markdown(tok: PreTrainedTokenizerBase, examples: list[dict], n: int) -> str:
    """The first `n` examples as text with the learned spans in **bold** (masked text plain)."""
    lines = ["# What is learned", "", "Bold = learned (label = token); plain = masked (-100).",
             ""]
    for i, ex in enumerate(examples[:n]):
        parts, cur, learned = [], [], None
        for t, lab in [*zip(ex["input_ids"], ex["labels"]), (None, None)]:
            flag = lab is not None and lab != IGNORE
            if t is None or (learned is not None and flag != learned):
                text = tok.decode(cur).replace("\n", "⏎")
                parts.append(f"**{text}**" if learned else text)
                cur = []
            if t is not None:
                cur.append(t)
                learned = flag
        n_learned = sum(lab != IGNORE for lab in ex["labels"])
        lines += [f"## Example {i} ({len(ex['input_ids'])} tokens, {n_learned} learned)", "",
                  "".join(parts), ""]
    return "\n".join(lines)


def write_sanity(out: Path, tok: PreTrainedTokenizerBase, examples: list[dict], n: int) -> None:
    if n > 0:
        atomic_write_text(out / "sanity_check.tsv", sanity_table(tok, examples, n))
        atomic_write_text(out / "sanity_check.md", sanity_markdown(tok, examples, n))


def plot_loss_curve(log: list[dict], path: Path, title: str = "") -> Path:
    """Train and dev loss against the optimizer step, as a PNG (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot()
    for key, label, style in [("loss", "train loss", "-"), ("eval_loss", "dev loss", "o-")]:
        pts = [(h["step"], h[key]) for h in log if key in h]
        if pts:
            ax.plot(*zip(*pts), style, label=label, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())
