"""Every config in configs/ is a valid PipelineConfig and starts with the command that runs it."""

from __future__ import annotations

import re

import pytest
import yaml

from tasks.runtime.paths import REPO_DIR
from tasks.runtime.errors import ConfigError
from tasks.config import PipelineConfig
from tasks.config.load import load_config

CONFIGS = sorted((REPO_DIR / "configs").glob("*.yaml"))
#: a path the user edits before running (configs/qlora_gpu_own_model.yaml)
PLACEHOLDER = re.compile(r"^\s*(source|path): /(data|models)/", re.M)


def test_there_are_shipped_configs():
    assert {p.name for p in CONFIGS} >= {"cpu_default.yaml", "qlora_gpu_own_model.yaml",
                                         "ptuning.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_shipped_config_validates_and_says_how_to_run_it(path):
    text = path.read_text(encoding="utf-8")
    assert isinstance(PipelineConfig.model_validate(yaml.safe_load(text)), PipelineConfig)
    if PLACEHOLDER.search(text):        # the user's own paths, to be edited: named as missing
        with pytest.raises(ConfigError, match=rf"{re.escape(path.name)}:\d+: \S+: no such "
                                              "file or directory: /(data|models)/"):
            load_config(path)
    else:
        assert isinstance(load_config(path), PipelineConfig)
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert re.search(rf"python -m flows\.\w+ --config configs/{re.escape(path.name)}",
                     "\n".join(header)), f"{path.name}: the leading comment names no command"


def test_the_cpu_default_config_is_the_embedded_default():
    shipped = load_config(REPO_DIR / "configs" / "cpu_default.yaml")
    default = PipelineConfig()
    for section in ("data", "base", "train", "merge", "quantize", "report", "registry"):
        assert getattr(shipped, section) == getattr(default, section), section
