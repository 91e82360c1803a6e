"""The tensors of safetensors files as a lazy state dict for `from_pretrained(state_dict=...)`:
each tensor is read from a memory map when transformers asks for it, copied to the load's
device, and its pages are then dropped from this process (`madvise(MADV_DONTNEED)`).

Why (docs/gpu.md "At 6 B on one GPU"): transformers maps the files and copies each tensor from the
map to the GPU, which is fast (a 6 B bf16 model in 1.6 s on an H200), but every page it read
stays resident in the process until loading ends: 12.5 GiB of host RSS. safetensors' `pread`
backend keeps the RSS down but loaded the same model in 18 s. Reading through the map and
dropping each tensor's pages once it is on the device keeps both: the page cache keeps the
file, the process holds only the tensors in flight (transformers reads four at a time).

The file layout is safetensors' own (an 8-byte little-endian header size, a JSON header of
dtype, shape and data offsets, then the data; https://github.com/huggingface/safetensors
"Format"). A tensor whose dtype is not in `DTYPES` is read by safetensors' `pread` backend.
"""

from __future__ import annotations

import json
import mmap
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

#: safetensors dtype names -> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
    "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_PAGE = mmap.PAGESIZE


class MappedTensor:
    """One tensor of a mapped file, read on `tensor[...]` (the interface of safetensors'
    `PySafeSlice` that transformers uses: `[...]`, `get_dtype()`, `get_shape()`)."""

    def __init__(self, mapped: mmap.mmap, start: int, end: int, dtype: str, shape: list[int],
                 device: str):
        self._mapped, self._start, self._end = mapped, start, end
        self._dtype, self._shape, self._device = dtype, shape, device

    def get_dtype(self) -> str:
        return self._dtype

    def get_shape(self) -> list[int]:
        return list(self._shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        start, end, mapped = self._start, self._end, self._mapped
        view = torch.frombuffer(mapped, dtype=torch.uint8, count=end - start, offset=start) \
            if end > start else torch.empty(0, dtype=torch.uint8)
        tensor = view.view(DTYPES[self._dtype]).reshape(self._shape).to(self._device, copy=True)
        del view
        first = start // _PAGE * _PAGE          # whole pages; a page shared with a neighbour
        last = min(-(-end // _PAGE) * _PAGE, len(mapped))      # is simply read again if needed
        if last > first:
            mapped.madvise(mmap.MADV_DONTNEED, first, last - first)
        return tensor[index]


def _close(mapped: mmap.mmap) -> None:
    try:
        mapped.close()
    except BufferError:        # a failed load's traceback still holds a view: the GC unmaps it
        pass


def mapped_state_dict(files: list[Path], device: str, stack: ExitStack) -> dict[str, Any]:
    """The tensors of `files` (name -> lazy tensor read onto `device`). The maps stay open
    until `stack` closes: close it after `from_pretrained` returns."""
    from safetensors import safe_open

    out: dict[str, Any] = {}
    for path in files:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
            # a private (copy-on-write) map: writable for torch.frombuffer, never written
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        stack.callback(_close, mapped)
        pread = None
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in DTYPES:
                pread = pread or stack.enter_context(
                    safe_open(path, framework="pt", device="cpu", backend="pread"))
                out[name] = pread.get_slice(name)
                continue
            begin, end = entry["data_offsets"]
            out[name] = MappedTensor(mapped, 8 + size + begin, 8 + size + end, entry["dtype"],
                                     entry["shape"], device)
    return out
