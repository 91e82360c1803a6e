"""What a model folder given as `base.path` needs before the pipeline can load it (README "Which
models"):

* `native`: transformers' own code reads it (Qwen2.5, Llama, GLM-4-hf, ...);
* `convert`: a ChatGLM2-6B, ChatGLM3-6B or original-format GLM-4 folder -- the seeds' models,
  whose own code no longer runs on current transformers -- is converted once into a native
  `GlmForCausalLM` folder by the base stage (tasks/model/chatglm.py);
* `refused`: anything else that needs the folder's own Python code (`auto_map` in config.json):
  ChatGLM-6B v1, Baichuan, InternLM, ... A folder's code is never run here: it is a security
  hole, and such code is written against the transformers of its day.

Light: reads JSON and text files only. transformers' table of native model types is imported
only for a folder that names code of its own.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: a line of a tiktoken vocabulary: a base64 token, a space, its rank
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ \d+\r?\n")
FORWARD = ("use ChatGLM2-6B, ChatGLM3-6B or GLM-4 in its original format (converted "
           "automatically), or a model of a family transformers supports natively (Qwen2.5, "
           "Llama, GLM-4-9B-chat-hf, ...)")


@dataclass(frozen=True)
class FolderKind:
    """How the pipeline treats a model folder; `family` for `convert`, `reason` for
    `refused` (one line, user-facing)."""

    kind: Literal["native", "convert", "refused"]
    family: str | None = None
    reason: str | None = None


def read_config(folder: Path) -> dict:
    """config.json of a model folder ({} when there is none or it is not a JSON object)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def classify(folder: Path | str) -> FolderKind:
    """Native, convertible (and which family) or refused, from the folder's files."""
    folder = Path(folder)
    config = read_config(folder)
    model_type = str(config.get("model_type", ""))
    if model_type == "chatglm":
        return _chatglm_kind(folder, config)
    code = config.get("auto_map") or {}
    if not code or _native(model_type):
        return FolderKind("native")
    modules = sorted({str(v if isinstance(v, str) else v[0]).split(".")[0] + ".py"
                      for v in code.values() if v})
    return FolderKind("refused", reason=(
        f"model_type {model_type or '(none)'!r} needs the folder's own Python code "
        f"({', '.join(modules)}), which this pipeline never runs (code from a model folder is "
        f"not executed, and such code is written for the transformers of its day); {FORWARD}"))


def _native(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def _chatglm_kind(folder: Path, config: dict) -> FolderKind:
    if config.get("position_encoding_2d") or "padded_vocab_size" not in config:
        return FolderKind("refused", reason=(
            "ChatGLM-6B (v1: GLM with 2-D positions and the icetk tokenizer) has no native "
            f"transformers architecture and its own code is not run here; {FORWARD}"))
    tokenizer = folder / "tokenizer.model"
    if not tokenizer.is_file():
        return FolderKind("refused", reason=(
            "a ChatGLM folder without tokenizer.model (the SentencePiece or tiktoken "
            "vocabulary the conversion needs)"))
    with tokenizer.open("rb") as f:
        if _TIKTOKEN_LINE.match(f.readline()):
            return FolderKind("convert", "glm4")
    specials = original_special_tokens(folder)
    return FolderKind("convert", "chatglm3" if "<|user|>" in (specials or ["<|user|>"])
                      else "chatglm2")


def original_special_tokens(folder: Path) -> list[str] | None:
    """The special tokens that the folder's `tokenization_chatglm.py` appends after the
    vocabulary, in order (its `special_tokens = [...]`), or None where it has no such list."""
    value = python_literal(folder / "tokenization_chatglm.py", "special_tokens")
    return [str(t) for t in value] if isinstance(value, list) else None


def python_literal(path: Path, name: str) -> object:
    """The literal value first assigned to `name` in a Python file, read from its syntax tree:
    the file is parsed, never run. None where there is no such file or assignment."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
                isinstance(t, (ast.Name, ast.Attribute)) and getattr(t, "id", getattr(
                    t, "attr", None)) == name for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                continue
    return None
