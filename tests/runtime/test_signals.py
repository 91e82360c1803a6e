"""How a signal ends a run wherever it lands (flows/ops/signals.py); the real processes are killed
in tests/ops/test_failure_modes.py."""

from __future__ import annotations

import signal

from prefect.exceptions import TerminationSignal

from flows.ops.hygiene import ending
from flows.ops.signals import as_raised_by_signal, signal_in


def _raised(make):
    try:
        make()
    except BaseException as e:          # noqa: BLE001 -- the test inspects what came out
        return e
    raise AssertionError("nothing was raised")


def _import_error_from(error: BaseException) -> ImportError:
    def wrap():
        try:
            raise error
        except BaseException as e:
            raise ImportError("initialization failed") from e
    return _raised(wrap)


def test_a_signal_that_surfaced_as_an_import_error_still_ends_the_run_as_killed():
    wrapped = _import_error_from(TerminationSignal(signal.SIGTERM))
    assert isinstance(signal_in(wrapped), TerminationSignal)
    assert ending(wrapped) == ("KILLED", "terminated by SIGTERM")
    again = as_raised_by_signal(wrapped)
    assert isinstance(again, TerminationSignal) and again.signal == signal.SIGTERM

    ctrl_c = _import_error_from(KeyboardInterrupt())
    assert ending(ctrl_c)[0] == "KILLED" and type(as_raised_by_signal(ctrl_c)) is KeyboardInterrupt


def test_an_error_raised_while_handling_a_signal_is_still_the_signal():
    def cleanup_fails():
        try:
            raise TerminationSignal(signal.SIGTERM)
        except BaseException:
            raise OSError("cleanup failed") from None      # context kept, only hidden
    assert ending(_raised(cleanup_fails))[0] == "KILLED"


def test_ordinary_errors_stay_failures():
    child = ChildProcessError("the merge's process was killed by SIGKILL (out of memory?)")
    child.signal = signal.SIGKILL               # an Exception naming a signal is a failure
    for error in (ValueError("bad"), child, _import_error_from(ValueError("bad"))):
        assert signal_in(error) is None and as_raised_by_signal(error) is error
        assert ending(error)[0] == "FAILED"
    cyclic = ValueError("a")
    cyclic.__context__ = RuntimeError("b")
    cyclic.__context__.__context__ = cyclic
    assert signal_in(cyclic) is None
