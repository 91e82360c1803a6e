"""The stage table (flows/stages.py `STAGES`): one list of the stages, in order, with what each
takes and what its MLflow child run holds; the flows and the tests read their names from it."""

from __future__ import annotations

import pytest
from prefect import Task

import flows.stages as stages
from flows.stages import STAGES, check_inputs, stage_of
from tasks.runtime.results import StageName, StageResult


def test_every_stage_takes_only_stages_computed_before_it():
    names = [s.name for s in STAGES]
    for i, stage in enumerate(STAGES):
        assert set(stage.inputs) <= set(names[:i]), (stage.name, stage.inputs)


def test_stage_names_are_one_enum():
    in_order = list(dict.fromkeys(s.name for s in STAGES))   # base: built, or resolved
    assert in_order == [n.value for n in StageName if not n.startswith("evaluate")]  # nightly
    # a name read back from a cached record becomes the enum; a misspelt one fails at once
    assert StageResult("train", "/out/train/1", "1").stage is StageName.TRAIN
    with pytest.raises(ValueError, match="'trian' is not a valid StageName"):
        StageResult("trian", "/out/train/1", "1")


def test_a_stage_is_given_only_the_results_its_row_lists():
    base, data = StageResult("base", "/out/base/1", "1"), StageResult("conversations", "/c/2", "2")
    check_inputs(stages.train_task, {"base": base, "data": data, "cfg": None})
    merged = StageResult("merge", "/out/merge/3", "3")
    with pytest.raises(ValueError, match=r"stage train was given the result of merge, which its "
                                         r"row of the stage table .* does not list"):
        check_inputs(stages.train_task, {"base": merged, "data": data})


def test_every_stage_task_of_the_flows_has_a_row():
    tasks = {name: t for name, t in vars(stages).items()
             if isinstance(t, Task) and name.endswith("_task")}
    assert len(tasks) >= 12
    assert {id(t) for t in tasks.values()} == {id(s.task) for s in STAGES}


def test_a_row_says_what_the_child_run_holds():
    result = StageResult("train", "/out/train/abc", "abc", files={"train_log": "/out/log.json"})
    assert stage_of(stages.train_task).artifacts(result) == {"adapter": "/out/train/abc"}
    assert stage_of(stages.benchmark_task).artifacts(result) == {"train_log": "/out/log.json"}
    assert stage_of(stages.resolve_base_task).artifacts(result) == {}
