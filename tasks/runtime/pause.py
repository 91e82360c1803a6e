"""Named points where a process waits to be signalled, for fault-injection tests (docs/design.md
"Failure modes"): a test that kills a run must not guess when the signal lands.

With `PIPELINE_PAUSE_AT=<point>=<marker file>` in its environment, the process that reaches
`pause_point("<point>")` writes its pid to the marker file and waits there (at most
`MAX_WAIT_SECONDS`) for the test's signal. With `PIPELINE_PAUSE_IMPORT=<module>` as well, the
wait happens inside `import <module>`, so that the signal lands while Python imports, as it can
when a kill hits a C extension's initialization. Unset -- always, outside tests -- a pause point
returns at once.

Points: `<stage>` while the stage's staging folder exists (tasks/runtime/files.py `staging_dir`);
`train:checkpoint` right after the train stage saved a checkpoint.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

AT, IMPORT = "PIPELINE_PAUSE_AT", "PIPELINE_PAUSE_IMPORT"
MAX_WAIT_SECONDS = 300.0


_waiting: tuple[str, Path] | None = None       # (point, marker) of the pause under way


def armed(point: str) -> Path | None:
    """The marker file of `point` if this process should pause there."""
    name, _, marker = os.environ.get(AT, "").partition("=")
    return Path(marker) if name == point and marker else None


def pause_point(point: str) -> None:
    """Wait here for a signal if the environment arms this point (module docstring)."""
    global _waiting
    if (marker := armed(point)) is None:
        return
    os.environ[AT] = ""                        # once per process, and not in its children
    _waiting = (point, marker)
    if module := os.environ.get(IMPORT):
        importlib.import_module(module)        # the module calls `wait_for_signal`
    else:
        wait_for_signal()


def wait_for_signal() -> None:
    """Write this pid to the marker of the point being paused at, then sleep until a signal
    ends the wait."""
    assert _waiting is not None, "wait_for_signal is called from an armed pause_point"
    point, marker = _waiting
    marker.write_text(str(os.getpid()), encoding="utf-8")
    deadline = time.monotonic() + MAX_WAIT_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.01)
    raise TimeoutError(f"paused at {point} for {MAX_WAIT_SECONDS:.0f} s: no signal came")
