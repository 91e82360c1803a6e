"""The kind of CPU a pinned figure was measured on. Float rounding in the CPU kernels depends on
the instruction set torch and bitsandbytes dispatch to (AVX512 with BF16, plain AVX512, AVX2,
...), so a loss pinned to three decimals is a fact about one kind of CPU. Tests keep their exact
pins per kind and hold any other kind to what is portable (the direction and size of a change)."""

from __future__ import annotations


def cpu_kind() -> str:
    """torch's CPU capability (`torch.backends.cpu.get_cpu_capability()`: "avx512", "avx2",
    "default", ...), plus "+bf16" where bitsandbytes' own check finds AVX512-BF16 (its 4-bit
    CPU kernels take another path there)."""
    import torch

    import tasks.model.compat  # noqa: F401  (first: it quiets bitsandbytes' notice about the Hub)
    from bitsandbytes.functional import has_avx512bf16

    kind = torch.backends.cpu.get_cpu_capability().lower()
    return f"{kind}+bf16" if has_avx512bf16() else kind
