"""glibc's mmap threshold, set once for every process that trains.

anomalib's coreset loop fragments glibc's heap (25 MB a step, seen up to 23.6 GB) unless
large blocks are mmapped. glibc reads ``MALLOC_MMAP_THRESHOLD_`` only at process start, so
the CLI re-executes itself with it; Ray starts its workers itself, so each worker sets the
same threshold through ``mallopt`` before its first run.
"""

from __future__ import annotations

import contextlib
import ctypes

MMAP_THRESHOLD_BYTES = 1 << 20
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number for it (malloc.h)


def set_mmap_threshold() -> None:
    """In a running process: what ``MALLOC_ENV`` does at start (no-op off glibc)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
