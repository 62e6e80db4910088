"""Giving the C heap's free memory back to the system, where the C library can.

glibc returns freed memory to the system only from the top of its main heap; what a burst
of large messages freed elsewhere (other threads' arenas, below a live object) stays in the
process, so its RSS stays at the burst's peak until ``malloc_trim`` is called.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

__all__ = ["release_free_memory"]


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc (musl, macOS), or no libc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Give the free pages of every malloc arena back to the system (glibc's
    ``malloc_trim(0)``); whether any were. False where the C library has no such call."""
    return _MALLOC_TRIM is not None and bool(_MALLOC_TRIM(0))
