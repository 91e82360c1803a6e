"""How a signal ends a run, wherever it lands (docs/design.md "Failure modes"). Light to import: no
Prefect, MLflow or torch (the command line uses it before they are imported).

A signal handler's exception surfaces where the signal lands. Landing in Python code, it is
the exception itself (`KeyboardInterrupt`, Prefect's `TerminationSignal`); landing while Python
imports a C extension, it can come out as that import's ImportError, raised from it. A run
that a signal ended is KILLED and its process dies of the signal either way.
"""

from __future__ import annotations

import os
import signal


def signal_in(error: BaseException) -> BaseException | None:
    """The Ctrl-C (`KeyboardInterrupt`) or signal (Prefect's `TerminationSignal`) that ended a
    run, if any: `error` itself, or an exception it was raised from or while handling. A signal
    that lands while Python imports a C extension surfaces as that import's ImportError
    (pybind11: "initialization failed"; numpy: "IMPORTANT: PLEASE READ THIS"), with the signal's
    exception as its cause: where the signal lands must not decide how the run ends."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if not isinstance(e, Exception) and (isinstance(e, KeyboardInterrupt) or
                                             isinstance(getattr(e, "signal", None), int)):
            return e
        todo += [e.__cause__, e.__context__]
    return None


def as_raised_by_signal(error: BaseException) -> BaseException:
    """The exception a run ended by `error` should end with: the signal's own (a fresh one, so
    that Prefect ends the flow run as it ends a signalled one and the process dies of the
    signal), or `error` itself when no signal is in its chain."""
    killer = signal_in(error)
    if killer is None or killer is error:
        return error
    if isinstance(killer, KeyboardInterrupt):
        return KeyboardInterrupt()
    return type(killer)(killer.signal)


def die_of(killer: BaseException) -> None:
    """End this process as the signal behind `killer` would have: the default action of its
    signal (SIGTERM: exit status -15), re-delivered to this process."""
    sig = signal.SIGINT if isinstance(killer, KeyboardInterrupt) else killer.signal
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    signal.pause()                              # (the default action ends the process)
