"""Hands the heap's free memory back to the kernel (glibc's malloc_trim).

glibc keeps what a process frees for reuse, so after a full sync (its script, the batch, the old
bookkeeping, and what the garbage collection after it frees) the process would stay at its peak.
Measured on the real kproxy at 10,000 Services (nftables mode): a trim a second after the first full
sync (kproxy/server.py) takes RSS from 100.8-100.9 to 99.5-99.6 MiB (three runs each)."""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """malloc_trim(0) where the C library has it (glibc); nothing elsewhere (musl has none)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
