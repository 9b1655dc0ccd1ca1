"""The process's heap: memory freed by one batch kept for the next, not handed back to the OS.

A worker's batch makes and frees a few megabytes of objects larger than Python's own
allocator serves (each risk score's JSON is ~2 KB, and orjson grows its buffer with
``realloc``; numpy's matrices of a batch are hundreds of KB). glibc gives the top of its heap
back to the OS once 128 KB of it is free, and serves blocks over 128 KB from fresh mappings,
so every batch faulted the same pages in again: ``perf`` counted 337,861 page faults in a
worker over the bench's (a), 45% of them in the risk scores' JSON, and 154,501 with the limits
raised (docs/performance.md, round 41). ``keep_freed_heap`` raises both limits, once per
process, so freed memory stays mapped for the next batch.

>>> keep_freed_heap(0)  # 0: glibc's defaults, nothing changed
False
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("abuse_detector.heap")

# mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper bound on 64-bit: larger values are refused
_TOP_PAD = 16 * 1024 * 1024  # asked of the OS beyond each growth of the heap: fewer, larger growths
MAX_MB = 2047  # mallopt takes a C int of bytes


def keep_freed_heap(megabytes: int) -> bool:
    """Keeps up to ``megabytes`` of freed memory at the top of glibc's heap, and serves blocks
    up to 32 MB (or ``megabytes``, if less) from the heap instead of their own mappings. Returns
    whether the allocator took the settings: False for 0, or with an allocator other than
    glibc's (musl, macOS), which is left as it is."""
    if not 0 <= megabytes <= MAX_MB:
        raise ValueError(f"the freed heap to keep (ABUSE_HEAP_KEEP_MB, --heap-keep-mb) must be 0 to {MAX_MB} MB, "
                         f"got {megabytes}")
    if megabytes == 0:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        log.info("no glibc mallopt here: the heap keeps its allocator's defaults")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    keep = megabytes * 1024 * 1024
    # The trim threshold last: setting any of these turns off glibc's own adjustment of the others.
    taken = (mallopt(_M_MMAP_THRESHOLD, min(keep, _MMAP_THRESHOLD_MAX)) == 1
             and mallopt(_M_TOP_PAD, min(keep, _TOP_PAD)) == 1
             and mallopt(_M_TRIM_THRESHOLD, keep) == 1)
    if not taken:
        log.info("the allocator refused mallopt's settings: the heap keeps its defaults")
    return taken
