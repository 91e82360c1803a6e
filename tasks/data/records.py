"""Record formats of the data stage (tasks/data/formats.py): each format's signature fields and
how one record becomes conversation turns, with every value checked and a problem named by its
JSON path below the record (`BadRecord`). The preference pairs (tasks/data/preferences.py) read
their prompts with the same parsers (`prompt_messages`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import orjson

from tasks.runtime.errors import DataError

if TYPE_CHECKING:
    from tasks.data.sources import ArrayLines

Turn = tuple[str, str, str, str]     # role, text, JSON paths (in the record) of text and role

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
                  "model": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


class BadRecord(Exception):
    """A problem inside one record: kind, JSON path below the record, plain-words reason."""

    def __init__(self, kind: str, where: str, reason: str):
        super().__init__(reason)
        self.kind, self.where, self.reason = kind, where, reason

    def error(self, path: Path, *, record: int, line: int | None, lines: ArrayLines,
              hint: str | None = None) -> DataError:
        """This problem as the one line a user reads: the file, the line, the record and the
        JSON path of the field. `line`: the record's line in JSON Lines; None for an element of
        a JSON array, whose path starts at `$[record]` and whose line `lines` looks up."""
        root = "$" if line is not None else f"$[{record}]"
        return DataError(path, self.reason, record=record, json_path=root + self.where,
                         line=lines.line_of(record) if line is None else line, hint=hint)


def an(word: str) -> str:
    return f"{'an' if word[:1] in 'aeio' else 'a'} {word}"


def type_name(value: Any) -> str:
    """How a JSON value is named in an error: "an object", "a string", ..."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "?")


def _text(rec: dict, key: str, where: str = "", *, optional: bool = False) -> str:
    value = rec.get(key)
    if value is None and optional:
        return ""
    if key not in rec:
        raise BadRecord("missing-field", where, f"has no field {key!r}")
    if not isinstance(value, str):
        shown = "" if value is None else f" ({orjson.dumps(value).decode()[:40]})"
        raise BadRecord("wrong-type", f"{where}.{key}",
                        f"is {type_name(value)}{shown}, expected a string")
    return value


def _list(rec: dict, key: str, where: str = "", *, optional: bool = False) -> list:
    value = rec.get(key)
    if value is None and optional:
        return []
    if key not in rec:
        raise BadRecord("missing-field", where, f"has no field {key!r}")
    if not isinstance(value, list):
        raise BadRecord("wrong-type", f"{where}.{key}",
                        f"is {type_name(value)}, expected an array")
    return value


def object_at(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise BadRecord("wrong-type", where, f"is {type_name(value)}, expected an object")
    return value


def _joined(*parts: str) -> str:
    return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# Record formats: their signature fields and how a record becomes turns
# ---------------------------------------------------------------------------------------------
def _qa(r: dict) -> list[Turn]:
    return [("user", _text(r, "q"), ".q", ""), ("assistant", _text(r, "a"), ".a", "")]


def _adgen(r: dict) -> list[Turn]:
    return [("user", _text(r, "content"), ".content", ""),
            ("assistant", _text(r, "summary"), ".summary", "")]


def _alpaca(r: dict) -> list[Turn]:
    out: list[Turn] = []
    if system := _text(r, "system", optional=True):
        out.append(("system", system, ".system", ""))
    for i, pair in enumerate(_list(r, "history", optional=True)):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise BadRecord("wrong-type", f".history[{i}]", f"is {type_name(pair)}"
                            + (f" of {len(pair)} items" if isinstance(pair, list) else "")
                            + ", expected a [question, answer] pair")
        for j, (role, text) in enumerate(zip(("user", "assistant"), pair)):
            if not isinstance(text, str):
                raise BadRecord("wrong-type", f".history[{i}][{j}]",
                                f"is {type_name(text)}, expected a string")
            out.append((role, text, f".history[{i}][{j}]", ""))
    prompt = _joined(_text(r, "instruction"), _text(r, "input", optional=True))
    return out + [("user", prompt, ".instruction", ""),
                  ("assistant", _text(r, "output"), ".output", "")]


def _instruct(r: dict) -> list[Turn]:
    return [("user", _joined(_text(r, "instruct"), _text(r, "query")), ".instruct", ""),
            ("assistant", _text(r, "answer"), ".answer", "")]


def _turn_list(r: dict, role_key: str, text_key: str, roles: dict[str, str]) -> list[Turn]:
    out: list[Turn] = []
    if role_key == "from" and (system := _text(r, "system", optional=True)):
        out.append(("system", system, ".system", ""))
    for i, turn in enumerate(_list(r, "conversations")):
        where = f".conversations[{i}]"
        turn = object_at(turn, where)
        role = _text(turn, role_key, where)
        if role not in roles:
            raise BadRecord("unknown-role", f"{where}.{role_key}", f"role {role!r} is unknown "
                            f"(known: {', '.join(roles)})")
        out.append((roles[role], _text(turn, text_key, where), f"{where}.{text_key}",
                    f"{where}.{role_key}"))
    return out


def _sharegpt(r: dict) -> list[Turn]:
    return _turn_list(r, "from", "value", SHAREGPT_ROLES)


def _conversation(r: dict) -> list[Turn]:
    return _turn_list(r, "role", "content", {role: role for role in ROLES})


def _turn_keys(r: dict) -> set[str]:
    turns = r.get("conversations")
    first = turns[0] if isinstance(turns, list) and turns else None
    return set(first) if isinstance(first, dict) else set()


@dataclass(frozen=True)
class RecordFormat:
    name: str
    fields: str                                   # for messages: what the format looks like
    matches: Callable[[dict], bool]               # the record carries this format's signature
    convert: Callable[[dict], list[Turn]]
    known: frozenset[str]                         # top-level fields the format reads


FORMATS = {f.name: f for f in [
    RecordFormat("qa", '{"q", "a"}', lambda r: {"q", "a"} <= r.keys(), _qa,
                 frozenset({"q", "a"})),
    RecordFormat("adgen", '{"content", "summary"}', lambda r: {"content", "summary"} <= r.keys(),
                 _adgen, frozenset({"content", "summary"})),
    RecordFormat("alpaca", '{"instruction", "output"[, "input", "system", "history"]}',
                 lambda r: {"instruction", "output"} <= r.keys(), _alpaca,
                 frozenset({"instruction", "input", "output", "system", "history"})),
    RecordFormat("instruct", '{"instruct", "query", "answer"}',
                 lambda r: {"instruct", "query", "answer"} <= r.keys(), _instruct,
                 frozenset({"instruct", "query", "answer"})),
    RecordFormat("sharegpt", '{"conversations": [{"from", "value"}, ...]}',
                 lambda r: "conversations" in r and not _turn_keys(r) & {"role", "content"},
                 _sharegpt, frozenset({"conversations", "system"})),
    RecordFormat("conversation", '{"conversations": [{"role", "content"}, ...]}',
                 lambda r: "conversations" in r and not _turn_keys(r) & {"from", "value"},
                 _conversation, frozenset({"conversations"})),
]}
KNOWN = "; ".join(f"{f.name} {f.fields}" for f in FORMATS.values())


def prompt_messages(record: dict, fmt: str) -> list[dict[str, str]]:
    """The prompt of a ranking record, whose answers are not part of it, as messages: read by
    the parser of the supervised format `fmt` (alpaca: its system, history, instruction and
    input; sharegpt and conversation: its turns), every text non-empty. `BadRecord` names the
    field (tasks/data/preferences.py)."""
    turns = FORMATS[fmt].convert({**record, "output": ""} if fmt == "alpaca" else record)
    turns = turns[:-1] if fmt == "alpaca" else turns        # less the placeholder answer
    _check_texts(turns)
    return [{"role": role, "content": text} for role, text, _, _ in turns]


def _check_texts(turns: list[Turn], max_chars: int | None = None) -> None:
    """Every text non-empty (and at most `max_chars` long)."""
    for role, text, where, _ in turns:
        if not text or text.isspace():
            raise BadRecord("empty-text", where, "is empty (or only white space)")
        if max_chars is not None and len(text) > max_chars:
            raise BadRecord("too-long", where, f"is {len(text):,} characters long, more than "
                                               f"max_chars={max_chars:,}")


def check_turns(turns: list[Turn], max_chars: int) -> None:
    """Texts non-empty and not too long; optional system turn, then user/assistant
    alternating, ending on an assistant turn."""
    _check_texts(turns, max_chars)
    body = turns[1:] if turns and turns[0][0] == "system" else turns
    if not body:
        raise BadRecord("no-turns", "", "has no user/assistant turns")
    for i, (role, _, text_at, role_at) in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise BadRecord("turn-order", role_at or text_at, f"is {an(role)} turn where "
                            f"{an(want)} turn is expected (an optional system turn first, then "
                            "user and assistant alternating)")
    if body[-1][0] != "assistant":
        raise BadRecord("ends-on-user", body[-1][2], "the conversation ends on a user turn "
                                                     "(there is no answer to learn from)")
