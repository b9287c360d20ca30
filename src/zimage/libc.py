"""The C library's memory calls (mallopt, malloc_trim, madvise) on Linux; None elsewhere or where it cannot load."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def _load() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


LIBC = _load()
