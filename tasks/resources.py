"""Peak memory of a stretch of work in this process: host RSS and CUDA memory.

Host: Linux's high-water mark of the resident set (`VmHWM` in /proc/self/status), reset at the
start through /proc/self/clear_refs ("5", Linux >= 4.0; where that is refused, the peak counts
from the process start, and `Peaks.rss_since_start` says so). CUDA: the peak of torch's caching
allocator, reset likewise; only when torch is already imported (the data-only flow never imports
it) and sees a GPU.
"""

from __future__ import annotations

import gc
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass
class Peaks:
    rss_mib: float = 0.0
    cuda_mib: float | None = None
    rss_since_start: bool = False


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cuda():
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() else None


@contextmanager
def peak_memory() -> Iterator[Peaks]:
    """`with peak_memory() as peaks: ...` fills `peaks` when the block ends (also on error)."""
    peaks = Peaks()
    gc.collect()                       # what an earlier stage left is not this block's memory
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
