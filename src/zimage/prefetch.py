"""Read-ahead of safetensors files: the disk reads the next group of tensors while the CPU converts this one.

Weights are read through memory maps, so each page is read from disk the moment the conversion touches it and
the disk idles while the CPU converts. A thread that reads the next group's bytes into the page cache (plain
`pread`, as `cat` does) turns those reads into cache hits, so loading runs at the disk's rate instead of the sum
of both. It stays one group ahead at most, so the page cache never holds more than two groups on its account.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

CHUNK = 16 * 2**20


def tensor_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (first byte, end byte) in the file, from the safetensors header (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__"}


class ReadAhead:
    """Reads groups of byte spans [(path, [(start, end), ...]), ...] in order on a daemon thread, at most one group
    ahead of the group `at(i)` last announced. Errors are ignored: the real read reports them."""

    def __init__(self, ranges: list[tuple[Path, list[tuple[int, int]]]]):
        self.ranges, self.current, self.stopped = ranges, -1, False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True, name="zimage-read-ahead")
        self.thread.start()

    def at(self, i: int) -> None:
        """The reader has started group i: the thread may read group i + 1."""
        with self.cond:
            self.current = i
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.thread.join()

    def _run(self) -> None:
        buf = memoryview(bytearray(CHUNK))
        for i, (path, spans) in enumerate(self.ranges):
            with self.cond:
                self.cond.wait_for(lambda: self.stopped or self.current >= i - 1)
                if self.stopped:
                    return
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                for start, end in spans:
                    while start < end and not self.stopped:
                        n = os.preadv(fd, [buf[: min(CHUNK, end - start)]], start)
                        if n <= 0:
                            break
                        start += n
            except OSError:
                pass
            finally:
                os.close(fd)
