"""Peak memory of a stretch of work in this process: host RSS and CUDA memory; and where its
time went, by phase (loading, saving, hashing a model; starting a child process).

Host: Linux's high-water mark of the resident set (`VmHWM` in /proc/self/status), reset at the
start through /proc/self/clear_refs ("5", Linux >= 4.0; where that is refused, the peak counts
from the process start, and `Peaks.rss_since_start` says so). CUDA: the peak of torch's caching
allocator, reset likewise; only when torch is already imported (the data-only flow never imports
it) and has used the GPU (checking never creates a CUDA context). Work done in child processes
(`tasks.runtime.child_process`) reports its own peaks, which count as the block's. Phases are
added by whoever times them (`add_phase`; `tasks.runtime.progress.step`); a child's come back with
its peaks.

Each block starts with a full garbage collection, so that what earlier work left (a released model
in a reference cycle) is not counted as this block's memory. What survives it is then set aside from
later collections (`gc.freeze`, Python's "gc" docs): without that, every collection inside a stage
(`tasks.model.modeling.release`, and Python's own ones of the oldest generation) walks the half a
million objects of the imported libraries again, ~0.7 s each on 2 cores; a run of the tiny
operations config made ~30 of them, over a quarter of its time. `thaw()` (a flow's end) gives the
set-aside objects back to the collector.
"""

from __future__ import annotations

import gc
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


@dataclass
class Peaks:
    rss_mib: float = 0.0
    cuda_mib: float | None = None
    rss_since_start: bool = False
    #: seconds by phase ("load", "save", "hash", "process_start", ...), summed over the block
    phases: dict[str, float] = field(default_factory=dict)


#: peaks of the child processes that finished since the innermost open `peak_memory()` began
_children: list[Peaks] = []
#: (phase, seconds) as timed in this process and its finished children, in order; kept while a
#: block is open (an enclosing block counts what its inner ones did)
_phase_log: list[tuple[str, float]] = []
_open_blocks = 0
#: this process reports every phase when it ends (a child process, `report_phases`)
_reporting = False


def _kept() -> bool:
    """Whether someone will read the phases timed now."""
    return bool(_open_blocks) or _reporting


def add_phase(phase: str, seconds: float) -> None:
    """Count `seconds` of `phase` in every open `peak_memory()` block (and, in a child process,
    in what it reports back, `report_phases`); with none open nobody reads it."""
    if _kept():
        _phase_log.append((phase, seconds))


def report_phases() -> None:
    """This process reports its phases when it ends (a child process): keep every one from now
    on, whatever blocks open and close inside it."""
    global _reporting
    _reporting = True


def phases_since(first: int = 0) -> dict[str, float]:
    """The seconds by phase logged since entry `first` of this process's phase log."""
    out: dict[str, float] = {}
    for phase, seconds in _phase_log[first:]:
        out[phase] = out.get(phase, 0.0) + seconds
    return out


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _hwm_mib() -> float:
    return _status_mib("VmHWM")


def rss_mib() -> float:
    """This process's resident set now, MiB (0 where /proc is missing)."""
    try:
        return _status_mib("VmRSS")
    except OSError:
        return 0.0


def own_peak_rss_mib() -> float:
    """This process's peak RSS in MiB: VmHWM, which belongs to the address space exec created
    (ru_maxrss survives fork+exec: a child of a 1 GB process would report 1 GB); ru_maxrss where
    /proc is missing."""
    try:
        return _hwm_mib()
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_child_peaks(peaks: Peaks) -> None:
    """Count a finished child process's peaks in the open `peak_memory()` block, and its phases
    in every open block."""
    _children.append(peaks)
    for phase, seconds in peaks.phases.items():
        add_phase(phase, seconds)


def _cuda():
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() and \
        torch.cuda.is_initialized() else None


@contextmanager
def peak_memory() -> Iterator[Peaks]:
    """`with peak_memory() as peaks: ...` fills `peaks` when the block ends (also on error)."""
    global _open_blocks
    peaks, first_child, first_phase = Peaks(), len(_children), len(_phase_log)
    _open_blocks += 1
    gc.collect()                       # what an earlier stage left is not this block's memory
    gc.freeze()                        # and what survives is not walked again (module docstring)
    if (cuda := _cuda()) is not None:
        cuda.empty_cache()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        peaks.rss_since_start = True
    if (cuda := _cuda()) is not None:
        cuda.reset_peak_memory_stats()
    try:
        yield peaks
    finally:
        try:
            peaks.rss_mib = _hwm_mib()
        except OSError:
            pass
        if (cuda := _cuda()) is not None:
            peaks.cuda_mib = cuda.max_memory_allocated() / 2**20
        peaks.phases = phases_since(first_phase)
        for child in _children[first_child:]:
            peaks.rss_mib = max(peaks.rss_mib, child.rss_mib)
            if child.cuda_mib is not None:
                peaks.cuda_mib = max(peaks.cuda_mib or 0.0, child.cuda_mib)
        del _children[first_child:]
        _open_blocks -= 1
        if not _kept():
            _phase_log.clear()


def thaw() -> None:
    """Give the objects `peak_memory()` set aside back to the garbage collector: at the end of a
    flow, so that what a run kept alive until then (its clients, its records) is collected once
    it is garbage, in a process that runs more flows (a notebook, the tests)."""
    gc.unfreeze()
