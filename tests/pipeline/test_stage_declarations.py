"""What a stage declares beside its core (flows/stages.py): its name, one enum, and what its
MLflow child run holds. Which stage is given which is said by the flows alone; the pipeline
tests check the order they compute in (tests/_ops_config.py `stage_names`)."""

from __future__ import annotations

from pathlib import Path

import pytest

import flows.stages as stages
from flows.caching import child_run_artifacts, logged_folder
from tasks.evaluate.report import Report
from tasks.runtime.results import StageName, StageResult


def test_a_stage_name_read_back_is_the_enum_and_a_misspelt_one_fails():
    assert StageResult("train", "/out/train/1", "1").stage is StageName.TRAIN
    with pytest.raises(ValueError, match="'trian' is not a valid StageName"):
        StageResult("trian", "/out/train/1", "1")


def test_a_child_run_holds_the_folder_a_stage_declares_else_its_files():
    result = StageResult("report", "/out/train/abc", "abc", out=Report(
        report_md=Path("/out/report.md"), report_html=Path("/out/report.html")))
    assert child_run_artifacts(stages.train_task, result) == {"adapter": "/out/train/abc"}
    assert child_run_artifacts(stages.report_task, result) == \
        {"report_md": "/out/report.md", "report_html": "/out/report.html"}
    # the torchao int4 stage: quantize's task under its own name, and its own folder
    assert stages.quantize_torchao_task.name == StageName.QUANTIZE_TORCHAO
    assert child_run_artifacts(stages.quantize_torchao_task, result) == \
        {"int4_torchao_model": "/out/train/abc"}
    assert child_run_artifacts(stages.quantize_task, result) == {"int4_model": "/out/train/abc"}
    # a copy with other options (retries, a timeout) is the same stage: the same folder
    retried = stages.merge_task.with_options(retries=2, timeout_seconds=600)
    assert logged_folder(retried) == "merged_model"
    assert child_run_artifacts(retried, result) == {"merged_model": "/out/train/abc"}
