"""What a stage is called, how it runs and what it returns. A stage's entry -- the function of
its module that the flows call, with upstream `StageResult`s -- is declared with `stage_entry`;
it returns a `StageResult` (small, JSON-able, cached by Prefect; the files stay on disk)
holding the stage's typed output (`stage_output`). Part of the runtime: no stage's cache key
covers it, so adding a stage re-keys no other stage."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import types
import typing
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Callable, TypeVar

from tasks.runtime.files import verify_outputs
from tasks.runtime.paths import project_dir

T = TypeVar("T")
#: a field of a stage output kept as detail (the record's `info`), even where it is a number
Info = Annotated[T, "info"]
#: metrics under their own names, for the ones a stage names at run time (a score per model)
Metrics = dict[str, float]


class StageName(StrEnum):
    """Every stage's name: its Prefect task, its MLflow child run and `outputs/<name>/`, in
    the order a run computes them."""

    INGEST = "ingest"
    CONVERSATIONS = "conversations"
    VALIDATE = "validate"
    DATA_REPORT = "data_report"
    PREFERENCE_DATA = "preference_data"    # preference tuning: the pairs (read with the data)
    BASE = "base"
    TRAIN = "train"
    MERGE = "merge"
    PREFERENCE = "preference"              # ... the adapter on the merged supervised model,
    MERGE_PREFERENCE = "merge_preference"  # ... folded into it
    QUANTIZE = "quantize"
    QUANTIZE_TORCHAO = "quantize_torchao"
    BENCHMARK = "benchmark"
    GENERATIONS = "generations"
    PREFERENCE_EVAL = "preference_eval"    # ... how often each model prefers the chosen answer
    REPORT = "report"
    EVALUATE_CHAMPION = "evaluate_champion"    # the nightly gate: the champion, as generations
    EVALUATE_CHAMPION_PREFERENCE = "evaluate_champion_preference"


class StepName(StrEnum):
    """The flows' steps that are not cached stages (each is a row of the run's summary and an
    MLflow run of its own)."""

    REGISTER = "register"          # the pipeline: registry versions of what build made
    GATE = "gate"                  # the nightly: champion against challenger


@dataclass(frozen=True)
class Declared:
    """How a stage runs, declared on its entry (`stage_entry`); flows/stages.py makes the
    cached Prefect task from it. `model_libs`: the versions of the model libraries are part of
    its cache key (flows/caching.py), with `extra_libs`; `ignore`: parameters that do not shape
    the output (a name shown in errors); `own_process`: on a GPU, the entry runs in a fresh
    process (tasks/runtime/child_process.py), so that the flow never holds a model;
    `logged_as`: its MLflow child run holds its output folder whole under this name (a model,
    an adapter: what the registry points at) rather than its result's files; `log_prints`:
    False where the core's libraries print what no one should read; `cached`: False for a
    stage that computes nothing (the user's own base model, used where it is)."""

    name: StageName
    model_libs: bool = False
    extra_libs: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    own_process: bool = False
    logged_as: str | None = None
    log_prints: bool | None = None
    cached: bool = True


F = TypeVar("F", bound=Callable[..., "StageResult"])


def stage_entry(name: StageName, **how: Any) -> Callable[[F], F]:
    """Decorator: `fn` is the entry of stage `name`, run as `Declared` says (its fields are
    the keyword arguments). `fn` itself is returned unchanged: a plain function of its module,
    callable without Prefect and picklable by name for a child process."""
    def declare(fn: F) -> F:
        fn.__stage__ = Declared(StageName(name), **how)
        return fn
    return declare


def declared(entry: Callable[..., Any]) -> Declared:
    """The declaration of a stage entry."""
    found = getattr(entry, "__stage__", None)
    if not isinstance(found, Declared):
        raise TypeError(f"{getattr(entry, '__qualname__', entry)!r} is not a stage entry "
                        "(declare it with tasks.runtime.results.stage_entry)")
    return found


def stage_root(stage: StageName) -> Path:
    """Where a stage keeps its content-addressed outputs: <project>/outputs/<stage>/."""
    return project_dir() / "outputs" / stage


def file_key(name: str) -> str:
    """The name of output file `name` as a field of a stage output (and a key of
    `StageResult.files`): its name with dots as underscores (`benchmark.json` ->
    `benchmark_json`), one style for every stage."""
    return name.replace(".", "_")


def stage_output(cls: type[T]) -> type[T]:
    """Class decorator: `cls` is what a stage returns, typed: a frozen keyword-only dataclass
    whose fields later stages read by name. For MLflow its fields are sorted by type: a `Path`
    is a file worth browsing (`StageResult.files`), a number a metric, a `Metrics` dict metrics
    under their own names, anything else -- or an `Info[...]` -- detail (`StageResult.info`)."""
    made = dataclass(frozen=True, kw_only=True)(cls)
    made.__stage_output__ = True
    return made


def _union_args(hint: Any) -> set[Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return set(typing.get_args(hint)) - {type(None)}
    return {hint}


@functools.cache
def _kinds(cls: type) -> dict[str, str]:
    """Each field of output class `cls`: "file", "metric", "metrics" or "info"."""
    hints = typing.get_type_hints(cls, include_extras=True)
    kinds = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if typing.get_origin(hint) is Annotated and "info" in hint.__metadata__:
            kinds[f.name] = "info"
            continue
        args = _union_args(hint)
        kinds[f.name] = ("file" if args == {Path} else
                         "metric" if args and args <= {int, float} else
                         "metrics" if args == {Metrics} else "info")
    return kinds


def output_to_json(out: Any) -> dict[str, Any] | None:
    """A stage output as JSON: its class (by module and name) and its fields."""
    if out is None:
        return None
    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    return {"type": f"{type(out).__module__}:{type(out).__qualname__}",
            "fields": {k: _plain(v) for k, v in fields.items()}}


def _plain(value: Any) -> Any:
    """A field value as JSON writes it: a path as its text, a numpy or torch scalar as a number."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (dict, list)):
        return value.item()
    return value


def output_from_json(data: Any) -> Any:
    """The stage output `output_to_json` wrote, refusing anything else: the class must be a
    `stage_output` of a `tasks.` module and every file, metric and metrics field of its type."""
    if data is None:
        return None
    if not isinstance(data, dict) or sorted(data) != ["fields", "type"]:
        raise ValueError("an output is an object of type and fields")
    module, _, name = str(data["type"]).partition(":")
    if not module.startswith("tasks.") or not name.isidentifier():
        raise ValueError(f"{data['type']!r} is not a stage output of this project")
    cls = getattr(importlib.import_module(module), name, None)
    if not getattr(cls, "__stage_output__", False):
        raise ValueError(f"{data['type']!r} is not a stage output")
    fields = data["fields"]
    if not isinstance(fields, dict) or set(fields) != set(_kinds(cls)):
        raise ValueError(f"{name} has other fields than {sorted(_kinds(cls))}")
    values = {}
    for key, kind in _kinds(cls).items():
        value = fields[key]
        if kind == "file":
            _check(value, str, key)
            value = None if value is None else Path(value)
        elif kind == "metric":
            _check(value, (int, float), key)
        elif kind == "metrics":
            if not isinstance(value, dict):
                raise ValueError(f"{key} is {type(value).__name__}, not an object")
            for k, v in value.items():
                _check(v, (int, float), f"{key}[{k!r}]")
        values[key] = value
    return cls(**values)


def _check(value: Any, kind: type | tuple[type, ...], what: str) -> None:
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ValueError(f"{what} is {type(value).__name__}")


@dataclass(frozen=True)
class StageResult:
    """The small, picklable record a stage returns (Prefect caches this; files stay on disk).

    `path` is the stage's main output (a file or a directory), `digest` its content digest, which
    is what downstream cache keys see. `out` is the stage's typed output (`stage_output`: the
    files, figures and details later stages read), `summary` markdown a person reads (the
    benchmark table, the report), `history` the step metrics of a training (one dict per logged
    step: its `step` and values, e.g. `loss`), `device` where a model stage computed, `dtype`
    the dtype a model output loads in (merge: its weights'; int4: its compute dtype).
    `result_id` is minted when the stage really executes, so a cache hit can be traced back to
    the run that computed it."""

    stage: StageName
    path: str
    digest: str
    out: Any = None
    summary: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    device: str | None = None
    dtype: str | None = None
    result_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage", StageName(self.stage))   # a typo fails here, loudly
        if self.out is not None and not getattr(type(self.out), "__stage_output__", False):
            raise TypeError(f"{type(self.out).__name__} is not a stage output (stage_output)")
        for name, value in (output_to_json(self.out) or {"fields": {}})["fields"].items():
            try:                            # what the cache cannot store fails here, not later
                json.dumps(value)
            except (TypeError, ValueError) as e:
                raise TypeError(f"{self.stage}: output field {name!r} is not JSON ({e})") from None

    def _of_kind(self, *kinds: str) -> dict[str, Any]:
        if self.out is None:
            return {}
        return {k: getattr(self.out, k) for k, kind in _kinds(type(self.out)).items()
                if kind in kinds}

    @property
    def files(self) -> dict[str, str]:
        """The output's files, by field name (what the MLflow child run holds)."""
        return {k: str(v) for k, v in self._of_kind("file").items() if v is not None}

    @property
    def metrics(self) -> dict[str, float]:
        """The output's numbers, by field name, and its `Metrics` under their own names."""
        out = {k: float(v) for k, v in self._of_kind("metric").items() if v is not None}
        for values in self._of_kind("metrics").values():
            out |= {k: float(v) for k, v in values.items()}
        return out

    @property
    def info(self) -> dict[str, Any]:
        """The output's other details."""
        return self._of_kind("info")

    def problem(self) -> str | None:
        """None if the outputs this result points at are there as published (docs/design.md
        "Failure modes"), else what is wrong with them."""
        return verify_outputs([self.path, *self.files.values()])

    def to_json(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                "out": output_to_json(self.out)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StageResult":
        return cls(**{**data, "out": output_from_json(data.get("out"))})
