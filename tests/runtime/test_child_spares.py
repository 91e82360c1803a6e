"""tasks/runtime/child_process.py on a GPU machine: each job runs in a spare, a process spawned
ahead of it that has imported the model code already (a fork server cannot: those imports
initialise CUDA). Here on a CPU, with `START = "spare"` and a light preload: the job runs in a
process that imported it before the job came, the next spare is waiting, lines, errors and
deaths come back as from a forked child, and a waiting spare ends with its caller."""

from __future__ import annotations

import logging
import os
import signal
import sys

import pytest

from tasks.runtime import child_process
from tasks.runtime.errors import DataError
from tasks.runtime.resources import peak_memory
from tests import _child_jobs

#: a module nothing here imports: its presence in a job's process shows the spare preloaded it
MARK = "tabnanny"


@pytest.fixture
def spares(monkeypatch):
    assert MARK not in sys.modules
    monkeypatch.setattr(child_process, "START", "spare")
    monkeypatch.setattr(child_process, "SPARE_PRELOAD", [MARK])
    yield
    child_process._end_spare()


def test_a_job_runs_in_a_spare_that_imported_before_it_and_the_next_one_waits(spares, caplog):
    child_process.prepare()
    first = child_process._spare.process
    preloaded, pid = child_process.call(_child_jobs.imported, MARK)
    assert preloaded and pid == first.pid != os.getpid()
    waiting = child_process._spare.process
    assert waiting.is_alive() and waiting.pid != first.pid
    caplog.set_level(logging.INFO, logger="tasks.runtime.progress")
    with peak_memory() as peaks:
        assert child_process.call(_child_jobs.hold_memory, 300) == 300 << 20
    assert peaks.rss_mib >= 300 and "process_start" in peaks.phases
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks.runtime.progress"]
    assert lines == [f"held 300 MiB in pid {waiting.pid}"]


def test_errors_and_deaths_come_back_from_a_spare_as_from_a_forked_child(spares, tmp_path):
    bad = tmp_path / "qa.txt"
    bad.write_text("只有问题没有答案？\n", encoding="utf-8")
    from tasks.data.qa_text import read_qa_text

    with pytest.raises(DataError, match="qa.txt"):
        child_process.call(read_qa_text, bad)
    with pytest.raises(RuntimeError, match=r"(?s)Unpicklable: 1 and 2.*raise_unpicklable"):
        child_process.call(_child_jobs.raise_unpicklable)
    with pytest.raises(ChildProcessError, match=r"die_by_sigkill .*killed by SIGKILL"):
        child_process.call(_child_jobs.die_by_sigkill)
    assert child_process.call(_child_jobs.imported, MARK)[0]     # and the next one still runs


def test_a_waiting_spare_ends_with_its_caller(tmp_path):
    """The caller exits with a spare waiting: it ends too, and the caller does not hang."""
    out = _child_jobs.run_script(
        tmp_path / "caller.py",
        "from tasks.runtime import child_process\n"
        "from tests import _child_jobs\n"
        "child_process.START = 'spare'\n"
        f"child_process.SPARE_PRELOAD = [{MARK!r}]\n"
        "if __name__ == '__main__':\n"
        f"    print(child_process.call(_child_jobs.imported, {MARK!r})[0])\n"
        "    print(child_process._spare.process.pid)\n")
    preloaded, spare = out.split()
    assert preloaded == "True"
    with pytest.raises(ProcessLookupError):
        os.kill(int(spare), 0)


def test_a_caller_that_ends_while_its_spare_still_imports_does_not_wait_for_it(tmp_path):
    """A run that ends early (a bad input) after `prepare()`: the spare, still importing (here
    for two minutes), is ended; the caller does not wait for its imports."""
    (tmp_path / "slow_import.py").write_text("import time\ntime.sleep(120)\n")
    out = _child_jobs.run_script(                   # waiting would raise TimeoutExpired
        tmp_path / "caller.py",
        "from tasks.runtime import child_process\n"
        "child_process.START = 'spare'\n"
        "child_process.SPARE_PRELOAD = ['slow_import']\n"
        "if __name__ == '__main__':\n"
        "    child_process.prepare()\n"
        "    print(child_process._spare.process.pid)\n", timeout=20)
    with pytest.raises(ProcessLookupError):
        os.kill(int(out.strip()), 0)


def test_a_spare_that_died_waiting_is_replaced_and_its_pipes_closed(spares):
    child_process.prepare()
    dead = child_process._spare
    os.kill(dead.process.pid, signal.SIGKILL)
    dead.process.join()
    preloaded, pid = child_process.call(_child_jobs.imported, MARK)
    assert preloaded and pid != dead.process.pid
    assert dead.jobs.closed and dead.records.closed
