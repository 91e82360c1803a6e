"""A PipelineConfig from what a user typed: an optional JSON/YAML file plus `--set KEY=VALUE`
overrides; a mistake is one `ConfigError` naming the file and line (or the `--set` argument),
the field, and what is wrong.

* `--set` values are literal strings unless they parse as JSON (numbers, booleans, null, lists,
  objects): `--set "data.source=/tmp/q&a #1.txt"` is that file name, `--set train.epochs=2` a
  number. A field that takes text keeps the literal (`--set registry.model_name=2024`).
* Relative paths are taken from the current directory, `~` is expanded; the input files the
  config names must exist.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from tasks.runtime.errors import ConfigError
from tasks.runtime.paths import is_local_model_path
from tasks.config.model_folder import classify
from tasks.config import PipelineConfig

M = TypeVar("M", bound=BaseModel)

def parse_value(model: type[BaseModel], key: tuple[str, ...], raw: str) -> Any:
    """A `--set` value: JSON if it parses as JSON, else the literal string; a field that
    takes text (a name, a path) keeps the literal even when it looks like a number."""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(value, (int, float, bool)) and _takes_text(model, key, raw):
        return raw
    return value


def _field(model: type[BaseModel], key: tuple[str, ...]):
    for i, part in enumerate(key):
        info = model.model_fields.get(part)
        if info is None:
            return None
        if i == len(key) - 1:
            return info
        model = info.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return None


def _takes_text(model: type[BaseModel], key: tuple[str, ...], raw: str) -> bool:
    info = _field(model, key)
    if info is None:
        return False
    try:
        return isinstance(TypeAdapter(info.annotation).validate_python(raw), (str, Path))
    except ValidationError:
        return False


# ---------------------------------------------------------------------------------------------
# The config file, with the line of every key
# ---------------------------------------------------------------------------------------------
def _lines(node: yaml.Node, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            here = prefix + (str(key.value),)
            out[here] = key.start_mark.line + 1
            out.update(_lines(value, here))
    return out


def read_config_file(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """(fields, line of each dotted key) of a JSON or YAML config file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "no such config file") from None
    except IsADirectoryError:
        raise ConfigError(path, "is a directory, expected a JSON/YAML config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, f"is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                                f"{e.start})") from None
    except OSError as e:
        raise ConfigError(path, f"cannot be read: {e.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(path, f"invalid YAML/JSON: {what}",
                          line=mark.line + 1 if mark else None) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        sections = ", ".join(PipelineConfig.model_fields)
        raise ConfigError(path, f"expected a mapping of config sections ({sections}), got "
                                f"{type(data).__name__}", line=1)
    return data, _lines(node)


# ---------------------------------------------------------------------------------------------
# Validation errors in the user's terms
# ---------------------------------------------------------------------------------------------
def _known(model: type[BaseModel], key: tuple[str, ...]) -> list[str]:
    if len(key) == 1:
        return list(model.model_fields)
    info = _field(model, key[:-1])
    inner = info.annotation if info is not None else None
    return list(inner.model_fields) if isinstance(inner, type) and issubclass(
        inner, BaseModel) else []


def _explain(model: type[BaseModel], error: dict) -> tuple[str, str | None]:
    """(what is wrong, hint) for one pydantic error."""
    key = tuple(str(p) for p in error["loc"])
    dotted = ".".join(key) or "the config"
    if error["type"] == "extra_forbidden":
        known = _known(model, key)
        close = difflib.get_close_matches(key[-1], known, n=1)
        inside = [f"{name}.{key[-1]}" for name, info in model.model_fields.items()
                  if len(key) == 1 and isinstance(info.annotation, type)
                  and issubclass(info.annotation, BaseModel)
                  and key[-1] in info.annotation.model_fields]
        hint = f"did you mean {inside[0]}?" if inside else \
            f"did you mean {'.'.join(key[:-1] + (close[0],))}?" if close else \
            f"known fields here: {', '.join(known)}" if known else None
        return f"{dotted}: unknown field", hint
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("model_type", "model_attributes_type"):
        message = f"expected a section of fields, got {error.get('input')!r}"
    return f"{dotted}: {message}", None


def _where(key: tuple[str, ...], file: Path | None, lines: dict, set_by: dict
           ) -> tuple[str, int | None]:
    for n in range(len(key), 0, -1):
        if key[:n] in set_by:
            return set_by[key[:n]], None
    inside = [arg for k, arg in set_by.items() if k[:len(key)] == key]
    if inside:                              # a check of a whole section: the arguments in it
        return " ".join(inside), None
    for n in range(len(key), 0, -1):
        if key[:n] in lines:
            return str(file), lines[key[:n]]
    return (str(file), None) if file else ("the config", None)


def _apply(model: type[BaseModel], data: dict, overrides: list[str], flag: str
           ) -> dict[tuple[str, ...], str]:
    """Apply `KEY=VALUE` overrides to `data`; return which argument set which key."""
    set_by: dict[tuple[str, ...], str] = {}
    for item in overrides:
        name, sep, raw = item.partition("=")
        key = tuple(p.strip() for p in name.split("."))
        if not sep or not all(key):
            raise ConfigError(f"{flag} {item}", "expected KEY=VALUE, e.g. train.method=qlora")
        node = data
        for i, part in enumerate(key[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{flag} {item}", f"{'.'.join(key[:i + 1])} is a value, "
                                                    "not a section")
        node[key[-1]] = parse_value(model, key, raw)
        set_by[key] = f"{flag} {item}"
    return set_by


def _validate(model: type[M], data: dict, file: Path | None, lines: dict, set_by: dict) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where, line = _where(tuple(str(p) for p in first["loc"]), file, lines, set_by)
        raise _one_line(model, e, where, line) from None


def validate_as(model: type[M], data: Any, where: str) -> M:
    """`model` from `data`, or a one-line ConfigError that names `where` the data came from
    (e.g. the Run form's options) and the first problem's dotted key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _one_line(model, e, where, None) from None


def _one_line(model: type[BaseModel], error: ValidationError, where: str,
              line: int | None) -> ConfigError:
    what, hint = _explain(model, error.errors()[0])
    more = error.error_count() - 1
    return ConfigError(where, what + (f" (and {more} more problem{'s' * (more > 1)})"
                                      if more else ""), line=line, hint=hint)


def load_model(model: type[M], overrides: list[str], flag: str = "--set") -> M:
    """A config model (e.g. GateConfig) from `KEY=VALUE` arguments alone."""
    data: dict[str, Any] = {}
    return _validate(model, data, None, {}, _apply(model, data, overrides, flag))


def load_config(path: Path | None = None, overrides: list[str] = (),
                check_inputs: bool = True) -> PipelineConfig:
    """Config from an optional JSON/YAML file plus dotted `key=value` overrides; with
    `check_inputs`, the files and folders it names must exist."""
    data, lines = read_config_file(Path(path)) if path else ({}, {})
    set_by = _apply(PipelineConfig, data, list(overrides), "--set")
    cfg = _validate(PipelineConfig, data, path, lines, set_by)
    if cfg.base.path and is_local_model_path(cfg.base.path):     # as meant: from the cwd
        local = Path(cfg.base.path.strip()).expanduser().absolute()
        cfg = cfg.model_copy(update={"base": cfg.base.model_copy(update={"path": str(local)})})
    if check_inputs:
        _check_inputs(cfg, path, lines, set_by)
    return cfg


def _check_inputs(cfg: PipelineConfig, path: Path | None, lines: dict, set_by: dict) -> None:
    """The files and folders the config names exist (before any run starts)."""
    wanted = {("data", "source"): (cfg.data.source, "exists"),
              ("data", "tokenizer"): (cfg.data.tokenizer, "is_dir"),
              ("report", "probes_file"): (cfg.report.probes_file, "is_file")}
    if cfg.base.path and is_local_model_path(cfg.base.path):
        wanted[("base", "path")] = (Path(cfg.base.path), "is_dir")
    for key, (value, test) in wanted.items():
        if value is None:
            continue
        where, line = _where(key, path, lines, set_by)
        dotted = ".".join(key)
        if not getattr(Path(value), test)():
            kind = {"exists": "file or directory", "is_dir": "directory",
                    "is_file": "file"}[test]
            raise ConfigError(where, f"{dotted}: no such {kind}: {value}", line=line,
                              hint="relative paths are taken from the current directory "
                                   f"({Path.cwd()})")
        if problem := _content_problem(key, Path(value)):
            raise ConfigError(where, f"{dotted}: {value}: {problem}", line=line)


def _content_problem(key: tuple[str, ...], path: Path) -> str | None:
    """What is wrong inside a file or folder the config names, checked cheaply up front (the
    stage that reads it would only find out hours later, after training)."""
    try:
        if key == ("report", "probes_file"):
            text = path.read_text(encoding="utf-8-sig")
            return None if text.strip() else "no probe questions: expected one per line"
        if key == ("base", "path"):
            config = path / "config.json"
            if not config.is_file():
                return "not a Hugging Face model folder (it has no config.json)"
            json.loads(config.read_text(encoding="utf-8"))
            return classify(path).reason            # a folder that needs its own code
    except (OSError, ValueError) as e:
        return f"cannot be read ({type(e).__name__}: {e})"
    return None
