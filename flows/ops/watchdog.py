"""Outlive a flow process by a moment, to stop what it started (docs/design.md "Failure modes").

    python flows/ops/watchdog.py <pid>        # started by flows.ops.hygiene.start_watchdog()

A flow process starts other processes: Prefect's temporary API server (a uvicorn process), the
benchmark's measuring processes, torchrun. If the flow is killed with SIGKILL (or dies of a
signal before its exit hooks run), they are re-parented to init and live on. This watchdog runs
as a child of the flow in a session of its own (a Ctrl-C or a kill of the flow's process group
does not reach it), notes the flow's descendants twice a second, and when the flow is gone sends
each one still alive SIGTERM, then SIGKILL after 10 s. Processes are tracked by pid and start
time, so a recycled pid is never signalled. It imports nothing of the project (run as a script).
"""

from __future__ import annotations

import os
import select
import signal
import sys

import psutil

POLL_S = 0.5
GRACE_S = 10.0


def watch(pid: int) -> list[psutil.Process]:
    """Poll until process `pid` is gone (or closes our stdin); return its descendants seen
    alive meanwhile."""
    flow = psutil.Process(pid)
    seen: dict[int, psutil.Process] = {}
    me = os.getpid()
    while os.getppid() == pid and flow.is_running():
        try:
            for child in flow.children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready and not sys.stdin.buffer.read1(1):      # EOF: the flow process has exited
            break
    return list(seen.values())


def stop(procs: list[psutil.Process]) -> None:
    alive = [p for p in procs if p.is_running()]        # is_running() also checks start time
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(alive, timeout=GRACE_S)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        procs = watch(int(sys.argv[1]))
    except psutil.NoSuchProcess:
        return 0
    stop(procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
