"""The pipeline config: defaults are the embedded default, the committed schema is current."""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import ValidationError

from tasks.runtime.paths import REPO_DIR
from tasks.runtime.errors import ConfigError
from tasks.config import SCHEMA_PATH, PipelineConfig, config_schema
from tasks.config.load import load_config


def test_committed_schema_is_generated_from_the_model():
    committed = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert committed == json.loads(json.dumps(config_schema(), default=str)), \
        "run `python -m tasks.config` to regenerate schemas/pipeline_config.schema.json"


def test_defaults_are_the_embedded_default_and_validate_against_the_schema():
    cfg = PipelineConfig()
    assert cfg.base.path is None and cfg.data.source.is_file()
    assert cfg.data.source.is_relative_to(REPO_DIR)
    jsonschema.validate(cfg.model_dump(mode="json"), config_schema())


def test_file_and_dotted_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  method: qlora\n  epochs: 2\n", encoding="utf-8")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}", encoding="utf-8")
    cfg = load_config(f, ["train.lora_r=4", "data.shuffle_seed=7",
                          f"base.path={tmp_path / 'model'}"])
    assert (cfg.train.method, cfg.train.epochs, cfg.train.lora_r) == ("qlora", 2, 4)
    assert (cfg.data.shuffle_seed, cfg.base.path) == (7, str(tmp_path / "model"))


@pytest.mark.parametrize("override, words", [
    ("train.methd=lora", "train.methd: unknown field"),
    ("train.method=sgd", "train.method: Input should be 'lora', 'qlora' or 'ptuning'"),
    ("data.train_ratio=1.5", "data.train_ratio: Input should be less than 1"),
    # bitsandbytes' AVX512-BF16 CPU kernel packs 4-bit weights in blocks of 64 inputs: a width
    # of 160 trained, then failed at the first int4 answer on such a CPU (README "Two commands")
    ("base.hidden_size=160", "base.hidden_size: Input should be a multiple of 64")])
def test_typos_and_bad_values_are_refused_naming_the_argument(override, words):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert str(caught.value) == f"--set {override}: {words}"


def test_preference_tuning_needs_a_merged_supervised_model():
    with pytest.raises(ConfigError, match=r"preference.method=dpo tunes the merged supervised "
                                          r"model, and train.method=ptuning makes none"):
        load_config(None, ["train.method=ptuning", "preference.method=dpo"])
    cfg = load_config(None, ["preference.method=orpo", "preference.format=alpaca_ranking"])
    assert cfg.preference.for_base(embedded=True).learning_rate == 1e-3
    assert cfg.preference.for_base(embedded=False).learning_rate == 5e-6


@pytest.mark.parametrize("value, scope", [("true", "layers"), ("false", "off"), ("step", "step"),
                                          ("layers", "layers")])
def test_benchmark_compile_names_what_it_compiles_and_reads_older_booleans(value, scope):
    assert load_config(None, [f"benchmark.compile={value}"]).benchmark.compile == scope
    with pytest.raises(ConfigError, match="benchmark.compile: Input should be 'off', 'step' or"):
        load_config(None, ["benchmark.compile=model"])


def test_the_model_itself_still_refuses_bad_values():
    with pytest.raises(ValidationError):
        PipelineConfig.model_validate({"train": {"method": "sgd"}})


def test_every_method_of_the_registry_is_a_valid_train_method():
    from tasks.config import TrainConfig
    from tasks.config.methods import METHODS

    schema = TrainConfig.model_json_schema()["properties"]["method"]
    assert set(schema["enum"]) == set(METHODS)
    for name, method in METHODS.items():
        cfg = TrainConfig(method=name)
        peft_cfg = method.peft_config(cfg, 64)
        assert peft_cfg.task_type == "CAUSAL_LM"
        assert (method.serving_quantization(cfg) is not None) == method.loads_4bit
    with pytest.raises(ValueError, match="does not work with ptuning"):
        TrainConfig(method="ptuning", packing=True)


def test_the_run_forms_options_schema_is_current():
    from tasks.config.run_form import OPTIONS_SCHEMA_PATH, options_schema

    committed = json.loads(OPTIONS_SCHEMA_PATH.read_text(encoding="utf-8"))
    assert committed == json.loads(json.dumps(options_schema(), default=str)), \
        "schemas/run_options.schema.json is stale: run `python -m tasks.config`"
