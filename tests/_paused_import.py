"""Imported at an armed pause point under `PIPELINE_PAUSE_IMPORT` (tasks/runtime/pause.py): the
process waits for its signal inside this import, and whatever the signal raises comes out as
pybind11 reports an exception raised while a C extension initializes (PYBIND11_MODULE's
`raise_from(e, PyExc_ImportError, "initialization failed")`): an ImportError from it."""

from tasks.runtime.pause import wait_for_signal

try:
    wait_for_signal()
except BaseException as error:
    raise ImportError("initialization failed") from error
