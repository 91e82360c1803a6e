"""Call a stage core in a fresh Python process, so the caller's memory never holds a model.

    result = child_process.call(merge.merge_adapter, base, adapter, "bfloat16", "cuda")

At 6 B, a process that has loaded a model keeps gigabytes of host memory after releasing it
(the CUDA context, allocator arenas, pinned staging buffers), and the next stage's peak
starts from there; a child that exits returns all of it (README "At 6 B on one GPU").

* The job (function, arguments) and the answer (result or exception) travel as pickles in
  files of a temporary folder: a function is pickled by its module and name, so it must be a
  module-level function of an importable module.
* The child's `tasks.*` log records (progress lines) come back over a pipe and are re-emitted
  on the caller's loggers, in the calling thread, so Prefect's task-run log still gets them.
  Its stdout and stderr are the caller's (tqdm bars, prints).
* The child's peak RSS (VmHWM) and peak CUDA memory come back with the answer and are added to
  the caller's `tasks.resources.peak_memory()` block.
* A child killed by a signal (the OOM killer, a Ctrl-C) raises `ChildProcessError` naming the
  function and the signal; its exception, if it can be pickled, is re-raised as it was.

Run as `python -m tasks.child_process JOB ANSWER LOG_FD` by `call` only.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, TypeVar

from tasks.common import REPO_DIR
from tasks.resources import Peaks, add_child_peaks, own_peak_rss_mib

T = TypeVar("T")


def call(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, computed in a new interpreter (see the module docstring)."""
    what = f"{fn.__module__}.{fn.__qualname__}"
    with tempfile.TemporaryDirectory(prefix="child-") as tmp:
        job, answer = Path(tmp) / "job.pkl", Path(tmp) / "answer.pkl"
        job.write_bytes(pickle.dumps((fn, args, kwargs)))
        read_end, write_end = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_DIR), os.environ.get("PYTHONPATH")) if p)}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tasks.child_process", str(job), str(answer),
                 str(write_end)], pass_fds=(write_end,), env=env, cwd=REPO_DIR)
        finally:
            os.close(write_end)
        try:
            with os.fdopen(read_end, encoding="utf-8") as records:
                for line in records:                  # until the child closes its end
                    _re_emit(json.loads(line))
            code = proc.wait()
        except BaseException:                         # Ctrl-C, a cancelled flow run: no orphan
            proc.terminate()
            proc.wait()
            raise
        if not answer.is_file():
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else \
                f"exited with status {code}"
            raise ChildProcessError(f"{what} ran in a process of its own, which {how} before "
                                    "it answered (a SIGKILL is often the out-of-memory killer)")
        ok, value, peaks = pickle.loads(answer.read_bytes())
    add_child_peaks(peaks)
    if not ok:
        raise value
    return value


def _re_emit(record: dict[str, Any]) -> None:
    logging.getLogger(record["name"]).log(record["level"], "%s", record["message"])


class _PipeHandler(logging.Handler):
    """Writes each record as one JSON line to the caller's pipe."""

    def __init__(self, fd: int):
        super().__init__()
        self.stream = os.fdopen(fd, "w", encoding="utf-8", buffering=1)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream.write(json.dumps({"name": record.name, "level": record.levelno,
                                      "message": record.getMessage()}) + "\n")


def _answer_of(error: BaseException) -> BaseException:
    """The error itself if it survives a pickle round trip (custom exceptions with extra
    constructor arguments may not), else a RuntimeError carrying its traceback."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        text = "".join(traceback.format_exception(error))
        return RuntimeError(f"{type(error).__name__}: {error}\n(in a child process)\n{text}")


def _child(job: str, answer: str, log_fd: int) -> None:
    handler = _PipeHandler(log_fd)
    for name in ("tasks", "flows"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    fn, args, kwargs = pickle.loads(Path(job).read_bytes())
    try:
        ok, value = True, fn(*args, **kwargs)
    except BaseException as error:                      # noqa: BLE001 -- handed to the caller
        ok, value = False, _answer_of(error)
    torch = sys.modules.get("torch")
    cuda = torch.cuda.max_memory_allocated() / 2**20 \
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    tmp = Path(answer + ".tmp")
    tmp.write_bytes(pickle.dumps((ok, value, Peaks(rss_mib=own_peak_rss_mib(),
                                                    cuda_mib=cuda))))
    os.replace(tmp, answer)                       # no answer file: the child did not finish


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
