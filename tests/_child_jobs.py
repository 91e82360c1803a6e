"""Module-level functions for tests/runtime/test_child_process.py: a job a child process runs must be
importable by its module and name."""

from __future__ import annotations

import logging
import os
import signal


def hold_memory(mib: int) -> int:
    """Touch `mib` MiB of host memory, say so on the progress logger, return its length."""
    block = bytearray(mib << 20)
    block[::4096] = b"\x01" * len(block[::4096])
    logging.getLogger("tasks.runtime.progress").info("held %d MiB in pid %d", mib, os.getpid())
    return len(block)


def die_by_sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Unpicklable(Exception):
    def __init__(self, a: int, b: int):
        super().__init__(f"{a} and {b}")


def raise_unpicklable() -> None:
    raise Unpicklable(1, 2)


def load_twice(seconds: float) -> None:
    """Two timed 'loads' of `seconds` each (tasks.runtime.progress.step, phase "load")."""
    import time

    from tasks.runtime.progress import step

    for _ in range(2):
        with step("a load", phase="load"):
            time.sleep(seconds)


def load_then_save_in_a_block() -> None:
    """A 'load', then a 'save' inside a peak_memory() block of its own (as the ChatGLM
    conversion measures itself): the child reports both."""
    from tasks.runtime.progress import step
    from tasks.runtime.resources import peak_memory

    with step("a load", phase="load"):
        pass
    with peak_memory():
        with step("a save", phase="save"):
            pass


def imported(module: str) -> tuple[bool, int]:
    """Whether this process had imported `module` before its job, and its pid."""
    import sys

    return module in sys.modules, os.getpid()


def run_script(path, text: str, timeout: float = 120) -> str:
    """Write `text` to the script `path`, run it with this project importable, and return its
    stdout once it exits 0 (`subprocess.TimeoutExpired` past `timeout` seconds)."""
    import subprocess
    import sys

    from tasks.runtime.paths import REPO_DIR

    path.write_text(text, encoding="utf-8")
    out = subprocess.run([sys.executable, str(path)], cwd=path.parent, capture_output=True,
                         text=True, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": str(REPO_DIR)})
    assert out.returncode == 0, out.stderr
    return out.stdout
