"""Keep large payload buffers in the heap instead of fresh ``mmap`` regions (glibc only).

By default glibc serves every allocation above 128 KB with its own ``mmap`` and gives it
back on ``free``, so each multi-megabyte pickle or base64 buffer is faulted in page by page
again: measured here, ``cloudpickle.dumps`` of 7 MB took 5.7 ms that way and 0.23 ms with
the thresholds raised. `tune_allocator` raises them once per process (``mallopt``); set
``FLASH_MALLOPT=0`` to leave the allocator alone. The cost: freed payload memory is kept for
reuse rather than returned to the operating system at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 64 * 1024 * 1024  # glibc caps it at 32 MB on 64-bit: the cap applies
_TRIM_THRESHOLD = 256 * 1024 * 1024

_done = False


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds once; True when applied."""
    global _done
    if (
        _done
        or not sys.platform.startswith("linux")
        or os.environ.get("FLASH_MALLOPT") == "0"
    ):
        return False
    _done = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, min(_MMAP_THRESHOLD, 32 * 1024 * 1024)) == 1
    return bool(ok and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1)
