"""The kind of CPU a pinned figure was measured on. Float rounding in the CPU kernels depends on
the instruction set torch and bitsandbytes dispatch to (AVX512 with BF16, plain AVX512, AVX2,
...), so a loss pinned to three decimals is a fact about one kind of CPU. Tests keep their exact
pins per kind and hold any other kind to what is portable (the direction and size of a change)."""

from __future__ import annotations

from pathlib import Path


def cpu_kind() -> str:
    """torch's CPU capability (`torch.backends.cpu.get_cpu_capability()`: "avx512", "avx2",
    "default", ...), plus "+bf16" where the CPU has AVX512-BF16 (bitsandbytes' 4-bit CPU
    kernels take another path there)."""
    import torch

    info = Path("/proc/cpuinfo")
    flags = set(info.read_text().split()) if info.is_file() else set()
    kind = torch.backends.cpu.get_cpu_capability().lower()
    return f"{kind}+bf16" if "avx512_bf16" in flags else kind
