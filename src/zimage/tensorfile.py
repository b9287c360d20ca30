"""Reading safetensors files at the disk's rate: whole tensors read with O_DIRECT on a thread, one ahead.

Through a memory map, each page is read from disk when the conversion touches it, so the disk idles while the CPU
converts, and the kernel spends more CPU filling and evicting the page cache than the conversion takes (measured:
8.3 GB of float32 to bfloat16 on 2 cores, 27 s of system time for the 24.6 GB transformer). Here a thread reads
the next tensor straight into one of two staging buffers (O_DIRECT: no page cache) while the caller converts the
current one: 8.3 GB in 6.2 s instead of 7.8 s, with half the CPU time. Where O_DIRECT is refused (macOS, tmpfs)
the same reads go through the page cache.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import queue
import struct
import threading
from pathlib import Path
from typing import Iterator

import torch

from .libc import LIBC

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ALIGN = 4096  # O_DIRECT wants offsets, lengths and addresses aligned to the device's block: 4096 covers all
HUGE = 2 * 2**20  # a transparent huge page on x86 and most ARM kernels
MADV_HUGEPAGE = 14


def host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty on the CPU, asking Linux for transparent huge pages where the tensor spans some: a 12 GB model
    then takes 6,000 page faults to fill instead of 3 million (measured: 111,662 vs 1,073,901 faults and 0.7 s less
    system time for 8.3 GB), and each product walks fewer page-table entries."""
    t = torch.empty(shape, dtype=dtype)
    size = t.numel() * t.element_size()
    if LIBC is not None and size >= 2 * HUGE:
        start, end = -(-t.data_ptr() // HUGE) * HUGE, (t.data_ptr() + size) // HUGE * HUGE
        LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE)  # advice: errors ignored
    return t


def tensor_entries(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, first byte, end byte) from a safetensors header (8-byte length, then JSON).
    Raises ValueError for a dtype torch lacks or a header that is not one."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    return {k: (DTYPES[v["dtype"]], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


class Staging:
    """A page-aligned buffer (anonymous mmap) that grows to the largest tensor it has held."""

    def __init__(self):
        self.buf: mmap.mmap | None = None

    def view(self, size: int) -> memoryview:
        if self.buf is None or len(self.buf) < size:  # the old one is unmapped when its last view is gone
            self.buf = mmap.mmap(-1, size + (-size) % ALIGN)
        return memoryview(self.buf)

    def owns(self, t: torch.Tensor) -> bool:
        if self.buf is None or not isinstance(t, torch.Tensor):
            return False
        start = torch.frombuffer(self.buf, dtype=torch.uint8, count=1).data_ptr()
        return start <= t.untyped_storage().data_ptr() < start + len(self.buf)


def read_into(fd: int, buf: memoryview, start: int, end: int) -> memoryview:
    """Bytes [start, end) of the file, read aligned into `buf`; the returned view holds exactly them."""
    lo, hi = start - start % ALIGN, end + (-end) % ALIGN
    pos = lo
    while pos < hi:
        n = os.preadv(fd, [buf[pos - lo : hi - lo]], pos)
        if n <= 0:
            break
        pos += n
    if pos < end:
        raise OSError(f"file ends at byte {pos}, before the tensor's end at {end}")
    return buf[start - lo : end - lo]


def as_tensor(data: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The bytes as a tensor, in place when they sit at an offset the dtype allows (safetensors writers align)."""
    if len(data) == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(data, dtype=torch.uint8)
    try:
        return raw.view(dtype).view(shape)
    except RuntimeError:  # unaligned: copy
        return raw.clone().view(dtype).view(shape)


def open_direct(path: Path) -> int:
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag)
        except OSError:  # the file system refuses O_DIRECT
            pass
    return os.open(path, os.O_RDONLY)


def stream(path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor, Staging]]:
    """(name, tensor, its staging buffer) for `names` in file order; each tensor lives in the staging buffer only
    until the next one is asked for, so the caller copies what it keeps (`Staging.owns` tells). A thread reads one
    tensor ahead. Raises OSError or ValueError for an unreadable file."""
    entries = tensor_entries(path)
    order = sorted(names, key=lambda n: entries[n][2])
    stages = [Staging(), Staging()]
    ready: queue.Queue = queue.Queue()  # unbounded: `free` bounds the tensors in flight to the two buffers
    free = threading.Semaphore(2)
    stop = threading.Event()

    def reader() -> None:
        try:
            fd = open_direct(path)
            try:
                for i, name in enumerate(order):
                    free.acquire()
                    if stop.is_set():
                        return
                    dtype, shape, start, end = entries[name]
                    data = read_into(fd, stages[i % 2].view(end - start + 2 * ALIGN), start, end)
                    ready.put((name, data, dtype, shape, stages[i % 2]))
            finally:
                os.close(fd)
        except BaseException as e:  # handed to the caller, which raises it
            ready.put(e)

    thread = threading.Thread(target=reader, daemon=True, name="zimage-read")
    thread.start()
    try:
        for _ in order:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            name, data, dtype, shape, stage = item
            yield name, as_tensor(data, dtype, shape), stage
            free.release()
    finally:
        stop.set()
        free.release()
        free.release()
        thread.join()
