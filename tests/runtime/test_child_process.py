"""tasks/runtime/child_process.py: a stage core computed in a process of its own (what the flow does
on a GPU, docs/gpu.md "At 6 B on one GPU") gives the same result as here, hands back its progress
lines, its errors and its peak memory, and a killed child is a clear error."""

from __future__ import annotations

import logging
import os

import pytest

from tasks.runtime import child_process
from tasks.runtime.errors import DataError
from tasks.export.merge import merge_adapter
from tasks.data.qa_text import read_qa_text
from tasks.runtime.resources import peak_memory
from tests import _child_jobs
from tests._tiny_model import make_adapter, make_base


def test_a_merge_in_a_child_is_the_merge_computed_here(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    base = make_base(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter")
    there = child_process.call(merge_adapter, base, adapter, "float32", "cpu")
    here = merge_adapter(base, adapter, "float32", "cpu")
    assert there.digest == here.digest and there.path == here.path
    assert there.device == "cpu" and there.files == here.files


def test_the_childs_peak_memory_and_progress_lines_come_back(caplog):
    caplog.set_level(logging.INFO, logger="tasks.runtime.progress")
    with peak_memory() as peaks:
        assert child_process.call(_child_jobs.hold_memory, 700) == 700 << 20
    assert peaks.rss_mib >= 700                 # the child's peak, not this process's
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks.runtime.progress"]
    assert len(lines) == 1 and lines[0].startswith("held 700 MiB in pid ")
    assert lines[0] != f"held 700 MiB in pid {os.getpid()}"


def test_the_childs_phases_come_back_with_the_time_it_took_to_start():
    with peak_memory() as outer:
        with peak_memory() as peaks:
            child_process.call(_child_jobs.load_twice, 0.2)
        child_process.call(_child_jobs.load_twice, 0.1)
    assert peaks.phases["load"] >= 0.4                    # both of the child's loads
    assert peaks.phases["process_start"] > 0
    assert set(peaks.phases) == {"load", "process_start"}
    # an enclosing block counts what happened in the blocks inside it too
    assert outer.phases["load"] >= peaks.phases["load"] + 0.2
    assert outer.phases["process_start"] > peaks.phases["process_start"]
    # a block the child opens and closes itself does not drop what it timed before
    with peak_memory() as peaks:
        child_process.call(_child_jobs.load_then_save_in_a_block)
    assert {"load", "save", "process_start"} <= set(peaks.phases)


def test_a_data_error_comes_back_as_itself(tmp_path):
    bad = tmp_path / "qa.txt"
    bad.write_text("绿萝怎么养？\n绿萝喜散射光。\n\n只有问题没有答案？\n",
                   encoding="utf-8")
    with pytest.raises(DataError) as here:
        read_qa_text(bad)
    with pytest.raises(DataError) as there:
        child_process.call(read_qa_text, bad)
    assert str(there.value) == str(here.value) and str(bad) in str(there.value)
    assert (there.value.path, there.value.line, there.value.reason) == \
        (here.value.path, here.value.line, here.value.reason)


def test_an_error_that_cannot_be_pickled_keeps_its_traceback():
    with pytest.raises(RuntimeError, match=r"(?s)Unpicklable: 1 and 2.*raise_unpicklable"):
        child_process.call(_child_jobs.raise_unpicklable)


def test_a_killed_child_is_a_clear_error_and_leaves_no_answer():
    with pytest.raises(ChildProcessError, match=r"die_by_sigkill .*killed by SIGKILL"):
        child_process.call(_child_jobs.die_by_sigkill)


def test_a_script_without_a_main_guard_is_not_run_again_in_the_child(tmp_path):
    """multiprocessing re-imports the caller's __main__ in each child unless it is left out:
    this script would call its child again from inside it, without end."""
    out = _child_jobs.run_script(
        tmp_path / "no_guard.py",
        "import os\n"
        "from tasks.runtime import child_process\n"
        "child_process.PRELOAD[:] = []     # what the server imports: nothing\n"
        "child_process.PRELOAD_WITHOUT_GPU[:] = []   # matters here (faster)\n"
        "print('child pid differs:', child_process.call(os.getpid) != os.getpid())\n")
    assert out.splitlines() == ["child pid differs: True"], out


def test_a_function_of_the_script_being_run_is_refused_at_once_naming_it(tmp_path):
    """The child starts without the caller's __main__, so it could not load such a function:
    one clear line before any process starts, not a child that dies unable to unpickle it."""
    out = _child_jobs.run_script(
        tmp_path / "job_in_main.py",
        "from tasks.runtime import child_process\n"
        "def job():\n    return 1\n"
        "if __name__ == '__main__':\n"
        "    try:\n        child_process.call(job)\n"
        "    except TypeError as e:\n        print(e)\n")
    assert out.startswith("__main__.job: a job for a child process must be a function of "
                          "an importable module"), out
