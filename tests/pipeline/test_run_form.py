"""The Run form (tasks/config/run_form.py) and the config are the same thing in two layouts: every
config field is on the form exactly once, and a config survives the trip through the form."""

from __future__ import annotations

import inspect

from flows.pipeline import run_form
from tasks.config import PipelineConfig
from tasks.config.run_form import ESSENTIALS, Options, from_config, to_config
from tests._ops_config import tiny


def _leaves(model: type, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out = set()
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and hasattr(kind, "model_fields"):
            out |= _leaves(kind, prefix + (name,))
        else:
            out.add(prefix + (name,))
    return out


def test_every_config_field_is_on_the_form_once():
    form = {(name,) for name in ESSENTIALS} | {("options",) + leaf for leaf in _leaves(Options)}
    assert len(form) == len(_leaves(PipelineConfig))
    assert list(inspect.signature(run_form.fn).parameters) == [*ESSENTIALS, "options"]


def test_a_config_survives_the_trip_through_the_form():
    for config in (PipelineConfig(), PipelineConfig.model_validate(tiny(
            base={"path": "/models/chatglm3-6b"}, train={"method": "qlora", "seed": 7,
                                                         "learning_rate": 3e-4}))):
        essentials, options = from_config(config)
        assert to_config(essentials, options) == config
        assert to_config(essentials, options.model_dump(mode="json")) == config


def test_an_empty_form_is_the_embedded_default_and_the_first_screen_wins():
    defaults = {name: p.default for name, p in inspect.signature(run_form.fn).parameters.items()
                if name != "options"}
    assert to_config(defaults, {}) == PipelineConfig()
    changed = to_config({**defaults, "epochs": 2, "method": "ptuning"}, {})
    assert changed.train.epochs == 2 and changed.train.method == "ptuning"
    assert changed.train.learning_rate is None, "0 on the form: the method's own default"


def test_a_mistake_in_the_options_is_one_line_naming_the_field():
    import pytest

    from tasks.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^the Run form's options: training_details\.batch_size"
                                          r": Input should be greater than or equal to 1$"):
        to_config({}, {"training_details": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="training: unknown field") as e:
        to_config({}, {"training": {}})
    assert "training_details" in e.value.hint
    with pytest.raises(ConfigError, match="packing does not work with ptuning"):
        to_config({"method": "ptuning"}, {"training_details": {"packing": True}})
