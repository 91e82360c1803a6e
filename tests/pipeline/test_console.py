"""What a person sees in the terminal (README "Two commands"): a cold run of the pipeline
prints a line per stage, progress where work takes more than a few seconds and the summary --
no library progress bars, no warnings a user cannot act on; `--verbose` prints everything.
The Prefect task log and MLflow keep every line either way."""

from __future__ import annotations

import re
import time

import pytest
import yaml

from tasks.runtime.progress import EVERY_S
from tests._ops_config import stage_names, tiny
import _cli  # noqa: E402  (tests/_cli.py)

pytestmark = pytest.mark.server
NOISE = re.compile(r"Warning|warnings\.warn|it/s\]|Loading weights|Writing model shards|"
                   r"Traceback|Task run .* Finished in state Completed")
#: lines of slow work, one per EVERY_S seconds: a step's progress, the wait for the server
PROGRESS = re.compile(r"\d+/\d+( \(.*\))?, \d+ s elapsed, about \d+ s left|"
                      r"^waiting for the temporary Prefect server .* s since it was started")


def test_a_cold_run_prints_a_line_per_stage_and_the_summary(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny(registry={"model_name": "console-chat"})))
    home = tmp_path / "home"
    started = time.monotonic()
    cold = _cli.run("pipeline", "--config", str(config), home=home, cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert cold.returncode == 0, cold.stderr + cold.stdout[-3000:]
    lines = cold.stdout.splitlines()
    # Progress lines come one per EVERY_S seconds of slow work, so how many a run prints
    # depends on the machine's speed (and its load); everything else is a fixed budget of 50.
    progress = [line for line in lines if PROGRESS.search(line)]
    assert len(lines) - len(progress) <= 50, "\n".join(lines)
    assert len(progress) <= elapsed / EVERY_S, "\n".join(progress)
    assert not [line for line in lines if NOISE.search(line)], cold.stdout
    stage_lines = [re.search(r"\[stage\] (\w+):", line)[1] for line in lines
                   if "[stage]" in line]
    assert stage_lines == stage_names()                  # one line each, in order
    assert not any(re.search(r"step \d+/\d+ \{", line) for line in lines)
    assert "Pipeline finished: 0/11 stages were cache hits." in cold.stdout
    assert cold.stderr == ""

    # --verbose: every line (a retrained model: the training steps, Prefect's own task lines)
    retrain = _cli.run("pipeline", "--config", str(config), "--set", "train.seed=7",
                       "--verbose", home=home, cwd=tmp_path)
    assert retrain.returncode == 0, retrain.stderr
    assert re.search(r"tasks\.train - step \d+/\d+ \{'loss'", retrain.stdout)
    assert re.search(r"Task run .* Finished in state Completed", retrain.stdout)
