"""The Run form of the `full-pipeline` deployment (README "Where to look"): what people change
first, then everything else in named sections.

Prefect renders a flow's parameters as the form behind the UI's Run button, in the order of the
flow's signature, a pydantic model as a card of its fields ordered by `position`
(https://docs.prefect.io/v3/advanced/form-building). The pipeline's config
(tasks/config/__init__.py) is organised by stage, as the command line and YAML files address it
(`--set train.epochs=3`); the form is organised by what a person changes: the seven fields of
`ESSENTIALS` on the first screen, then one `options` parameter, a JSON box of named sections holding
the rest of the config, field for field (`Options`; schemas/run_options.schema.json). The sections
come as one JSON box, not as nested forms, because Prefect's form shows every nested field expanded:
66 of them made an 8,000-px page.

`to_config` and `from_config` turn one into the other without loss (a test checks it for every
field), so the form, the command line and the YAML files run the same `PipelineConfig`. The
sections reuse the config's own fields (types, defaults, descriptions, checks): a section is
its config class minus the fields the first screen already asks for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from tasks.runtime.paths import SCHEMA_DIR
from tasks.config.load import validate_as
from tasks.config import BaseModelConfig, BenchmarkConfig, DataConfig, MergeConfig, \
    PipelineConfig, PreferenceConfig, QuantizeConfig, ReportConfig, TrainConfig, json_schema

#: the first screen: form parameter -> the config field it sets (their one-line descriptions,
#: in the user's words, are the Args of the flow's docstring: flows/pipeline.py `run_form`)
ESSENTIALS: dict[str, tuple[str, ...]] = {
    "data_file": ("data", "source"), "base_model": ("base", "path"),
    "method": ("train", "method"), "epochs": ("train", "epochs"),
    "learning_rate": ("train", "learning_rate"), "model_name": ("registry", "model_name"),
    "experiment": ("experiment",)}
_TAKEN = set(ESSENTIALS.values())
#: a first-screen value that means "not given" (the form has no empty number)
UNSET = ("", 0, 0.0, None)


def _section(config: type[BaseModel], section: str, title: str, doc: str) -> type[BaseModel]:
    """`config`'s fields minus those the first screen asks for, as a model of its own."""
    fields = {name: (info.annotation, info) for name, info in config.model_fields.items()
              if (section, name) not in _TAKEN}
    # the config's own cross-field checks run when the PipelineConfig is built (`to_config`)
    return create_model(title.replace(" ", ""), __doc__=doc,
                        __config__=ConfigDict(extra="forbid", title=title), **fields)


DataOptions = _section(DataConfig, "data", "Data options",
                       "How the data file is read, split and checked.")
TrainingDetails = _section(TrainConfig, "train", "Training details",
                           "Batch, length, LoRA and P-Tuning v2 settings, checkpoints.")
EmbeddedDefault = _section(BaseModelConfig, "base", "Embedded default model",
                           "The tiny model built offline when no base model is given.")


class MergeAndQuantize(BaseModel):
    """Folding the adapter into the model, and the int4 models made from it."""

    model_config = ConfigDict(extra="forbid", title="Merge and quantize")
    merge: MergeConfig = Field(default_factory=MergeConfig, json_schema_extra={"position": 0})
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig,
                                     json_schema_extra={"position": 1})


class Options(BaseModel):
    """Everything else, in sections; the defaults are the embedded default's."""

    model_config = ConfigDict(extra="forbid", title="Options")
    data_options: DataOptions = Field(default_factory=DataOptions,
                                      json_schema_extra={"position": 0})
    training_details: TrainingDetails = Field(default_factory=TrainingDetails,
                                              json_schema_extra={"position": 1})
    merge_and_quantize: MergeAndQuantize = Field(default_factory=MergeAndQuantize,
                                                 json_schema_extra={"position": 2})
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig,
                                         json_schema_extra={"position": 3})
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig,
                                       json_schema_extra={"position": 4})
    report: ReportConfig = Field(default_factory=ReportConfig, json_schema_extra={"position": 5})
    embedded_default_model: EmbeddedDefault = Field(default_factory=EmbeddedDefault,
                                                    json_schema_extra={"position": 6})


#: form section -> the config section it holds (merge_and_quantize holds two)
SECTIONS = {"data_options": "data", "training_details": "train", "preference": "preference",
            "benchmark": "benchmark", "report": "report", "embedded_default_model": "base"}


def to_config(essentials: dict[str, Any], options: Options | dict | None) -> PipelineConfig:
    """The PipelineConfig of a form: the first screen's fields over the options' sections (a
    mistake in either: a one-line ConfigError naming the field)."""
    options = options if isinstance(options, Options) else \
        validate_as(Options, options or {}, "the Run form's options")
    data: dict[str, Any] = {cfg: getattr(options, form).model_dump()
                            for form, cfg in SECTIONS.items()}
    data["merge"] = options.merge_and_quantize.merge.model_dump()
    data["quantize"] = options.merge_and_quantize.quantize.model_dump()
    for name, path in ESSENTIALS.items():
        if essentials.get(name, None) not in UNSET:
            target = data
            for key in path[:-1]:
                target = target.setdefault(key, {})
            target[path[-1]] = essentials[name]
    return validate_as(PipelineConfig, data, "the Run form")


def _form_value(name: str, value: Any) -> Any:
    """A config value as the first screen shows it (`UNSET` for "not given")."""
    if value is None:
        return 0.0 if name == "learning_rate" else ""
    return str(value) if isinstance(value, Path) else value


def from_config(config: PipelineConfig) -> tuple[dict[str, Any], Options]:
    """The form's values (first screen, options) that give back `config`."""
    dumped = config.model_dump()
    essentials = {}
    for name, path in ESSENTIALS.items():
        value: Any = dumped
        for key in path:
            value = value[key]
        essentials[name] = _form_value(name, value)
    sections = {form: {k: v for k, v in dumped[cfg].items() if (cfg, k) not in _TAKEN}
                for form, cfg in SECTIONS.items()}
    options = Options.model_validate({**sections, "merge_and_quantize": {
        "merge": dumped["merge"], "quantize": dumped["quantize"]}})
    return essentials, options



def deployment_parameters(config: PipelineConfig) -> dict[str, Any]:
    """`config` as the deployment's default parameters (what the Run form opens with): the
    first screen's values, and in `options` only what differs from the defaults."""
    essentials, options = from_config(config)
    return {**essentials, "options": options.model_dump(mode="json", exclude_defaults=True)}


OPTIONS_SCHEMA_PATH = SCHEMA_DIR / "run_options.schema.json"


def options_schema() -> dict:
    return json_schema(Options)

