"""The install is what the lock says (docs/design.md "Dependencies"), and the one known-harmless warning
of the stack stays out of the user's terminal while real ones still show."""

from __future__ import annotations

import logging
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.version import Version

from tasks.runtime.paths import REPO_DIR
from tasks.model.compat import NO_HUB_KERNEL

LOCK = REPO_DIR / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)$")


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = PIN.match(line)
            assert match, f"{LOCK.name}: not an exact pin: {line!r}"
            pins[match[1]] = match[2]
    return pins


def test_the_lock_pins_the_stack_exactly():
    pins = locked()
    assert Version(pins["transformers"]) >= Version("5.24")
    for name in ["peft", "bitsandbytes", "prefect", "mlflow", "datasets", "pyarrow", "jsonschema",
                 "sentencepiece", "accelerate", "fastapi", "sqlalchemy", "uv", "pip"]:
        assert name in pins, name
    assert "torch" not in pins, "torch is pinned by the Makefile (TORCH_PIN), not the lock"


def test_this_environment_is_the_lock():
    """What `make setup` installed is exactly the lock: a fresh machine next month gets the same."""
    differ = {}
    for name, pinned in locked().items():
        try:
            have = version(name)
        except PackageNotFoundError:
            have = None
        if have != pinned:
            differ[name] = (pinned, have)
    if differ and not Path(sys.prefix, ".installed").exists():
        pytest.skip(f"not a `make setup` venv; {len(differ)} packages differ from the lock")
    assert not differ, differ


def test_the_hub_kernel_notice_is_filtered_and_nothing_else(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please "
                       "make sure you already `pip install kernels`",
                       ModuleNotFoundError("No module named 'kernels'"))
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s",
                       RuntimeError("kernel ABI mismatch"))
    messages = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith(NO_HUB_KERNEL) for m in messages), messages
    assert any("kernel ABI mismatch" in m for m in messages), messages
