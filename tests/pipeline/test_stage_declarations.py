"""What a stage declares on its entry (tasks/runtime/results.py `stage_entry`): its name, how
its task runs and what its MLflow child run holds; flows/stages.py makes the task from that
alone. Which stage is given which input is said by the flows; the pipeline tests check the
order they compute in (tests/_ops_config.py `stage_names`)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from flows.stages import child_run_artifacts, logged_folder, stage_task
from tasks.evaluate import report
from tasks.export import merge, quantize
from tasks.runtime.code_version import code_closure
from tasks.runtime.paths import REPO_DIR
from tasks.runtime.results import StageName, StageResult, declared, stage_entry
from tasks.train import train


def test_a_stage_name_read_back_is_the_enum_and_a_misspelt_one_fails():
    assert StageResult("train", "/out/train/1", "1").stage is StageName.TRAIN
    with pytest.raises(ValueError, match="'trian' is not a valid StageName"):
        StageResult("trian", "/out/train/1", "1")
    with pytest.raises(ValueError, match="'trian' is not a valid StageName"):
        stage_entry("trian")(lambda: None)


def test_a_child_run_holds_the_folder_a_stage_declares_else_its_files():
    result = StageResult("report", "/out/train/abc", "abc", out=report.Report(
        report_md=Path("/out/report.md"), report_html=Path("/out/report.html")))
    assert child_run_artifacts(train.stage, result) == {"adapter": "/out/train/abc"}
    assert child_run_artifacts(report.stage, result) == \
        {"report_md": "/out/report.md", "report_html": "/out/report.html"}
    # the torchao int4 model: quantize's core under a stage name of its own, its own folder
    assert stage_task(quantize.torchao_stage).name == StageName.QUANTIZE_TORCHAO
    assert child_run_artifacts(quantize.torchao_stage, result) == \
        {"int4_torchao_model": "/out/train/abc"}
    assert child_run_artifacts(quantize.stage, result) == {"int4_model": "/out/train/abc"}
    assert logged_folder(merge.preference_stage) == logged_folder(merge.stage) == "merged_model"


def test_a_function_that_is_no_entry_is_refused_in_one_line():
    with pytest.raises(TypeError, match="'render_report' is not a stage entry"):
        stage_task(report.render_report)


def test_a_stage_task_is_made_once_and_keeps_the_entry_a_plain_function():
    made = stage_task(train.stage)
    assert made is stage_task(train.stage)
    assert made.name == "train" and made.fn.__wrapped__ is train.stage
    assert made.task_key != stage_task(merge.stage).task_key     # Prefect tells them apart
    assert list(inspect.signature(made.fn).parameters) == ["base", "data", "cfg"]
    assert train.stage.__module__ == "tasks.train.train"    # picklable by name for a child


def test_every_stage_name_has_an_entry_and_the_entry_is_keyed_with_its_module():
    """Each StageName is declared once or more on an entry of a stage module, and that module
    is one of the modules the key covers (the entry is part of the stage's code)."""
    declared_names = {}
    for path in (REPO_DIR / "tasks").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(d, ast.Call) and getattr(d.func, "id", "") == "stage_entry"
                    for d in node.decorator_list):
                module = ".".join(path.relative_to(REPO_DIR).with_suffix("").parts)
                declared_names.setdefault(module, []).append(node.name)
    import importlib

    names = set()
    for module, functions in declared_names.items():
        loaded = importlib.import_module(module)
        for fn in functions:
            names.add(declared(getattr(loaded, fn)).name)
        assert path_of(module) in code_closure(module)
    assert names == set(StageName)


def path_of(module: str) -> Path:
    return REPO_DIR.joinpath(*module.split(".")).with_suffix(".py")
