"""Call a stage core in a fresh Python process, so the caller's memory never holds a model.

    result = child_process.call(merge.merge_adapter, base, adapter, "bfloat16", "cuda")

At 6 B, a process that has loaded a model keeps gigabytes of host memory after releasing it
(the CUDA context, allocator arenas, pinned staging buffers), and the next stage's peak
starts from there; a child that exits returns all of it (docs/gpu.md "At 6 B on one GPU").

* Without a GPU, children are forked from a fork server (Python's `multiprocessing`
  "forkserver"): one clean interpreter per caller, started at the first call, that has
  imported torch, transformers, this project's model code, peft and bitsandbytes (`PRELOAD`,
  `PRELOAD_WITHOUT_GPU`). A child then starts in well under a second instead of the ~10 s
  those imports take on 2 cores.
* With a GPU a fork server cannot import the model code: peft (through bitsandbytes) and
  torchao initialise CUDA when they are imported, and a process forked from one that has
  cannot use the GPU; with bitsandbytes preloaded alone, transformers' imports fail in the
  children (benchmarks/results/child_start_h100.json). There each child is a spare: a process
  spawned ahead of its job, which imports `SPARE_PRELOAD` and then waits. Each call takes the
  waiting spare and starts the next one, which imports while this job runs; `prepare()`
  starts the first one before the first job. A spare left at exit is told to end.
* Either way a child runs in the caller's current environment variables and working
  directory, and initialises CUDA itself.
* The job (function, arguments) and the answer (result or exception) travel as pickles in
  files of a temporary folder: a function is pickled by its module and name, so it must be a
  module-level function of an importable module.
* The child's `tasks.*` log records (progress lines) come back over a pipe and are re-emitted
  on the caller's loggers, in the calling thread, so Prefect's task-run log still gets them.
  Its stdout and stderr are the fork server's, i.e. the caller's when the server started.
* The child's peak RSS (VmHWM), peak CUDA memory and phase seconds come back with the answer and
  are added to the caller's `tasks.runtime.resources.peak_memory()` block, with one phase more:
  `process_start`, from the call to the moment the child has its job (fork, and the imports of
  the job's module that the fork server had not done).
* A child that died before it answered (killed by a signal: the OOM killer, a Ctrl-C) raises
  `ChildDied` (a `ChildProcessError`) naming the function and the signal; its exception, if it
  can be pickled, is re-raised as it was.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
import types
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, NamedTuple, TypeVar

from tasks.runtime.resources import Peaks, add_child_peaks, add_phase, own_peak_rss_mib, \
    phases_since, report_phases

#: what the fork server imports once, on every machine
PRELOAD = ["torch", "transformers", "tasks.runtime.child_process", "tasks.model.model_spec",
           "tasks.evaluate.benchmark"]
#: and where there is no GPU: the model code. With a GPU these would initialise CUDA in the
#: server, and no forked child could use it then: transformers' model code imports torchao, whose
#: triton check reads the GPU's properties, and bitsandbytes (imported by peft) does at import.
PRELOAD_WITHOUT_GPU = ["tasks.model.modeling", "tasks.model.decode", "peft", "bitsandbytes"]
#: with a GPU: what a spare imports before its job (an absent one is left to the job to report)
SPARE_PRELOAD = [*PRELOAD, *PRELOAD_WITHOUT_GPU, "torchao", "tasks.train.train",
                 "tasks.export.merge", "tasks.export.quantize", "tasks.evaluate.generations"]
#: how children start: "auto" (spares where there is a GPU, else the fork server), "spare" or
#: "fork server"
START: Literal["auto", "spare", "fork server"] = "auto"

T = TypeVar("T")


class _Job(NamedTuple):
    """What a child is given: where its job's pickle is and its answer goes, and the caller's
    environment variables and working directory."""

    job: str
    answer: str
    environ: dict[str, str]
    cwd: str


class ChildDied(ChildProcessError):
    """The child ended before it answered; `signal`: the signal that killed it, if one did."""

    def __init__(self, message: str, signal_number: int | None = None):
        super().__init__(message)
        self.signal = signal_number

    def __reduce__(self):
        return type(self), (str(self), self.signal)


def call(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, computed in a new process (see the module docstring)."""
    what = f"{fn.__module__}.{fn.__qualname__}"
    if fn.__module__ == "__main__":          # the child starts without it (_main_module_left_out)
        raise TypeError(f"{what}: a job for a child process must be a function of an importable "
                        "module, not of the script being run; move it into a module and import "
                        "it from there")
    called = time.monotonic()         # CLOCK_MONOTONIC: one clock for every process on the host
    with tempfile.TemporaryDirectory(prefix="child-") as tmp:
        job, answer = Path(tmp) / "job.pkl", Path(tmp) / "answer.pkl"
        job.write_bytes(pickle.dumps((fn, args, kwargs)))
        given = _Job(str(job), str(answer), dict(os.environ), os.getcwd())
        if _spares():
            proc, records = _give_spare(given)
        else:
            proc, records = _fork(what, given)
        try:
            with records:
                while True:                           # until the child closes its end
                    try:
                        _re_emit(records.recv())
                    except EOFError:
                        break
            proc.join()
        except BaseException:                         # Ctrl-C, a cancelled flow run: no orphan
            proc.terminate()
            proc.join()
            raise
        if not answer.is_file():
            code = proc.exitcode or 0
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else \
                f"exited with status {code}"
            raise ChildDied(f"{what} ran in a process of its own, which {how} before it "
                            "answered (a SIGKILL is often the out-of-memory killer)",
                            -code if code < 0 else None)
        ok, value, peaks, started = pickle.loads(answer.read_bytes())
    add_phase("process_start", started - called)
    add_child_peaks(peaks)
    if not ok:
        raise value
    return value


def _fork(what: str, given: _Job) -> tuple[BaseProcess, Connection]:
    """A child forked from the fork server, given its job at once."""
    records, write_end = multiprocessing.Pipe(duplex=False)
    proc = fork_server().Process(target=_child, name=what, args=(given, write_end))
    try:
        with _main_module_left_out():
            proc.start()
    finally:
        write_end.close()                         # the child holds the only write end
    return proc, records


def _spares() -> bool:
    if START != "auto":
        return START == "spare"
    import torch

    return torch.cuda.is_available()


@dataclass
class _Spare:
    """A spawned child waiting for its job (`_wait_for_job`)."""

    process: BaseProcess
    jobs: Connection                  # where its job goes
    records: Connection               # where its log records come back


_spare: _Spare | None = None
_spare_lock = threading.Lock()


def prepare() -> None:
    """Where children are spares (a GPU), start the first one now, so that it imports while
    the caller does other work (the data stages) rather than when the first job comes."""
    global _spare
    with _spare_lock:
        if _spares() and _spare is None:
            _spare = _start_spare()


def _start_spare() -> _Spare:
    context = multiprocessing.get_context("spawn")
    jobs_read, jobs = context.Pipe(duplex=False)
    records, records_write = context.Pipe(duplex=False)
    proc = context.Process(target=_wait_for_job, name="spare child",
                           args=(jobs_read, records_write, SPARE_PRELOAD))
    with _main_module_left_out():
        proc.start()
    jobs_read.close()
    records_write.close()                     # the spare holds the only write end
    _end_spare_at_exit()
    return _Spare(proc, jobs, records)


def _give_spare(given: _Job) -> tuple[BaseProcess, Connection]:
    """The waiting spare (one started now if there is none, or if it died waiting), given the
    job; the next spare starts importing while it runs."""
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
        if spare is not None and not spare.process.is_alive():
            _drop(spare)
            spare = None
        spare = spare or _start_spare()
        try:
            spare.jobs.send(given)
        finally:
            spare.jobs.close()
        _spare = _start_spare()
    return spare.process, spare.records


@functools.cache
def _end_spare_at_exit() -> None:
    """At exit, the waiting spare is ended: before multiprocessing's own exit handler, which
    would wait for it forever (registered later, this runs first)."""
    atexit.register(_end_spare)


def _end_spare() -> None:
    """End the waiting spare. It has no job, so it is terminated rather than left to finish
    its imports (seconds) before it would see its job pipe closed."""
    global _spare
    spare, _spare = _spare, None
    if spare is not None:
        _drop(spare)


def _drop(spare: _Spare) -> None:
    """A spare without a job: ended, its pipes closed."""
    spare.jobs.close()
    spare.records.close()
    spare.process.terminate()
    spare.process.join()


def _wait_for_job(jobs: Connection, records: Connection, preload: list[str]) -> None:
    """A spare: import `preload`, then run the job it is given (`_child`); without one (the
    caller ended), end."""
    import importlib

    for module in preload:
        try:
            importlib.import_module(module)
        except Exception:     # noqa: BLE001 -- not installed here: the job's own import says so
            pass
    try:
        given = jobs.recv()
    except EOFError:
        return
    _child(given, records)
    # its answer is written: end as a forked child does, without the interpreter's teardown
    # (a second or more with torch loaded, which the caller would wait for)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@functools.cache
def fork_server() -> ForkServerContext:
    """This process's fork server context; the server itself starts with the first child."""
    import torch

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        PRELOAD + ([] if torch.cuda.is_available() else PRELOAD_WITHOUT_GPU))
    return context


@contextmanager
def _main_module_left_out() -> Iterator[None]:
    """Start a child without the caller's `__main__`. multiprocessing re-imports the main module
    of the caller in each child (as `__mp_main__`): a script without a `__main__` guard would
    run again there, and a `python -m flows.pipeline` child would import Prefect and MLflow for
    nothing. A job is a function of an importable module, so the child never needs it."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _re_emit(record: dict[str, Any]) -> None:
    logging.getLogger(record["name"]).log(record["level"], "%s", record["message"])


class _PipeHandler(logging.Handler):
    """Sends each record's name, level and message to the caller."""

    def __init__(self, connection: Connection):
        super().__init__()
        self.connection = connection

    def emit(self, record: logging.LogRecord) -> None:
        self.connection.send({"name": record.name, "level": record.levelno,
                              "message": record.getMessage()})


def _answer_of(error: BaseException) -> BaseException:
    """The error itself if it survives a pickle round trip (custom exceptions with extra
    constructor arguments may not), else a RuntimeError carrying its traceback."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        text = "".join(traceback.format_exception(error))
        return RuntimeError(f"{type(error).__name__}: {error}\n(in a child process)\n{text}")


def _child(given: _Job, records: Connection) -> None:
    os.environ.clear()                            # the caller's, as a fresh process would have
    os.environ.update(given.environ)
    os.chdir(given.cwd)
    handler = _PipeHandler(records)
    for name in ("tasks", "flows"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    report_phases()
    fn, args, kwargs = pickle.loads(Path(given.job).read_bytes())     # imports fn's module
    started = time.monotonic()
    try:
        ok, value = True, fn(*args, **kwargs)
    except BaseException as error:                      # noqa: BLE001 -- handed to the caller
        ok, value = False, _answer_of(error)
    torch = sys.modules.get("torch")
    cuda = torch.cuda.max_memory_allocated() / 2**20 \
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    tmp = Path(given.answer + ".tmp")
    peaks = Peaks(rss_mib=own_peak_rss_mib(), cuda_mib=cuda, phases=phases_since())
    tmp.write_bytes(pickle.dumps((ok, value, peaks, started)))
    os.replace(tmp, given.answer)                 # no answer file: the child did not finish
