"""Give freed heap memory back to the operating system (glibc), so peak RSS tracks live memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only; musl has none
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """``malloc_trim(0)``: return the free pages of glibc's heaps to the OS. Activations of one calibration
    layer are freed into glibc's free lists, which otherwise stay resident (benchmarks/results/
    prune_sameday2.md). Returns whether it ran (False off glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
